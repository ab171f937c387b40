"""CLI command groups, one module each; ``testbed.cli`` registers them."""
