"""Target data: built-in sets, image folders and captioned sets, cached with their conditions."""
