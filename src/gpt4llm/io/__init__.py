"""Files: writes that appear whole or not at all."""
