"""The built-in demos: digits and photo patches (class-conditional DiT) and the ControlNet demo."""
