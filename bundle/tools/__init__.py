"""Maintainers' tools, left out of the release zip: packaging, the atlas files, head checks on the template's copies and the dev heads, the failure set, figures and report timing."""
