"""The MiniLM sentence encoder, in process (NumPy), shared by every policy that embeds text."""
