"""safemeta: safe meta-reinforcement learning with dual-method policy adaptation."""
__version__ = "0.1.0"
