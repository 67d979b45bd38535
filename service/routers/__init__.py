"""One router per area: search, images (reads and writes), categories, admin (health and stats)."""
