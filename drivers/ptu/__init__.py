"""PicoQuant PTU files: decoder, replay tagger, recorder."""
