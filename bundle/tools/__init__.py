"""Maintainers' tools, left out of the release zip: packaging, atlas files, head checks, failure set, figures."""
