"""Networks (encoders, heads, the neutral renderer, discriminator) and the IPD-FER
objectives as nn.Modules."""
