"""LongCat-Video-Avatar's DiT (1.5 and 1.0), written from ../shared/spec/longcat-avatar-inference.md §3."""
