"""The FPN neck: top-down (and optional bottom-up) feature pyramid, and its backbone builders."""
