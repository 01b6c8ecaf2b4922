"""Shipped device profiles (TOML); a package so that they install with waveclip-edge."""
