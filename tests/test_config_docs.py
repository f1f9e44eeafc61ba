"""Settings are declared once (service/settings.py): the README's and
docs/configuration.md's settings tables are what `ipdfer settings --markdown`
prints, and the commands' options carry the settings' own defaults."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from service import predict, server, worker
from service.settings import Settings, add_options

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- settings table: `ipdfer settings (?P<args>[^`]*)`[^>]*-->\n(?P<table>.*?)"
                   r"<!-- end of settings table -->", re.S)


def generated_blocks(path: Path) -> list[tuple[str, str, str]]:
    """(arguments, table as committed, table as printed now) per block of `path`."""
    out = []
    for m in BLOCK.finditer(path.read_text()):
        args = shlex.split(m["args"])
        short = args[args.index("--short") + 1:] if "--short" in args else None
        out.append((m["args"], m["table"], Settings.markdown_table(short or None, short=short is not None)))
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_the_settings_tables_are_the_settings(doc):
    blocks = generated_blocks(REPO / doc)
    assert blocks, f"{doc} has no generated settings table"
    for args, committed, printed in blocks:
        assert committed == printed, f"{doc}: re-run `ipdfer settings {args}` and paste its table"


def test_a_changed_default_shows_as_a_stale_table(tmp_path, monkeypatch):
    """The comparison can fail: the table printed with another default differs."""
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- settings table: `ipdfer settings --markdown --short port` -->\n"
                   + Settings.markdown_table(["port"], short=True) + "<!-- end of settings table -->\n")
    ((_, committed, printed),) = generated_blocks(doc)
    assert committed == printed
    monkeypatch.setattr(Settings.model_fields["port"], "default", 8080)
    ((_, committed, printed),) = generated_blocks(doc)
    assert committed != printed and "`8080`" in printed


@pytest.mark.parametrize("module, names", [(server, server.SERVE_OPTIONS), (worker, worker.WORKER_OPTIONS),
                                           (predict, predict.PREDICT_OPTIONS)])
def test_command_options_come_from_the_settings(module, names):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for name in names:
        action = actions[name]
        assert action.default is None   # unset: the environment's (or the field's) value stands
        assert f"{Settings.variable(name)}, default {Settings.shown_default(name)})" in action.help
    given = parser.parse_args([*(["images.jpg"] if module is predict else []), "--max-batch-size", "4"])
    assert Settings.from_args(given, names).max_batch_size == 4


def test_an_option_parses_as_its_setting_validates():
    parser = argparse.ArgumentParser()
    add_options(parser, ("precision", "flip_tta", "max_wait_ms"))
    args = parser.parse_args(["--precision", "int8", "--flip-tta", "false", "--max-wait-ms", "2.5"])
    settings = Settings.from_args(args, ("precision", "flip_tta", "max_wait_ms"))
    assert (settings.precision, settings.flip_tta, settings.max_wait_ms) == ("int8", False, 2.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])
