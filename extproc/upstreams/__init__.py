"""One translator per upstream kind (``triton``, ``openai``) behind one interface, picked by a tier's
``kind`` from :mod:`~extproc.upstreams.registry`. Adding a kind is one file here plus a registry line."""
