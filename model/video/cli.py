"""`ipdfer video FILE`: a video through the serving engine, on the command line.

    ipdfer video talk.mp4 --csv talk.csv            # one row per (sampled frame, track)
    ipdfer video talk.mp4 --json talk.json --fps 10 # frames, tracks and their summaries

Prints the per-track summary as JSON lines on stdout; a progress bar on stderr
when it is a terminal."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from model.video.analyze import VideoOptions
    d = VideoOptions()
    p.add_argument("video", type=Path, help="MP4, WebM, MOV, AVI, MKV ... (anything FFmpeg decodes)")
    p.add_argument("--csv", type=Path, help="write one row per (sampled frame, track) here")
    p.add_argument("--json", type=Path, help="write the whole result (frames, tracks) here")
    p.add_argument("--fps", type=float, default=d.fps, help=f"frames analysed per second of video (default {d.fps:g})")
    p.add_argument("--smoothing", type=float, default=d.smoothing_s, metavar="SECONDS",
                   help=f"time constant of the per-track smoothing, 0 = none (default {d.smoothing_s:g})")
    p.add_argument("--max-faces", type=int, default=d.max_faces, help=f"faces per frame (default {d.max_faces})")
    p.add_argument("--weights", type=Path, help="weights folder (default: the shipped weights/)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.serving.analyzer import Analyzer
    from model.video.analyze import VideoOptions, analyze_video, to_csv
    from model.video.decode import VideoError
    if args.fps <= 0 or args.smoothing < 0:
        raise SystemExit("ipdfer video: --fps must be > 0 and --smoothing >= 0")
    kwargs = {"device": args.device} if args.device else {}
    analyzer = Analyzer.load(args.weights, **kwargs)
    bar = tqdm(unit="frame", disable=None, file=sys.stderr)

    def progress(done: int, expected: int | None) -> None:
        bar.total = expected
        bar.update(done - bar.n)

    try:
        result = analyze_video(analyzer, args.video, VideoOptions(args.fps, args.smoothing, args.max_faces),
                               progress=progress)
    except VideoError as e:
        print(json.dumps({"file": str(args.video), "error": e.kind, "detail": e.detail}))
        return 1
    finally:
        bar.close()
    if args.csv:
        args.csv.write_text(to_csv(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict()))
    for track in result.tracks:
        print(json.dumps(track))
    print(f"{len(result.frames)} frames analysed, {len(result.tracks)} track(s), "
          f"{result.stats['broken_packets']} broken packet(s) skipped", file=sys.stderr)
    return 0
