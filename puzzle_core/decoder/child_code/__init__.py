"""The files written next to every child of a :class:`~puzzle_core.decoder.family.DecoderFamily`.

They import only the standard library, torch and transformers (and each other, relatively),
so an exported child loads without puzzle installed. Do not import puzzle from here.
"""
