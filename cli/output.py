"""What the CLI shows people: hit tables and contact sheets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps


def route_line(route) -> str | None:
    """How an --auto query was routed, in words."""
    if route is None:
        return None
    p = route.prediction.probabilities[route.level]
    if route.routed:
        return f"routed: searched within {route.within} (predicted {route.prediction.path}, p={p:.2f} at {route.level})"
    return (f"not routed: searched everywhere (predicted {route.prediction.path}, p={p:.2f} at {route.level} "
            f"< {route.min_confidence})")


def hits_table(query: str, hits: Sequence, note: str | None = None) -> str:
    lines = [f"query: {query}"] + ([f"  {note}"] if note else [])
    if not hits:
        return "\n".join(lines + ["  (no hits)"])
    width = max(len(h.category or "") for h in hits)
    lines.append(f"  {'#':>3}  {'distance':>9}  {'category':<{width}}  id")
    for rank, hit in enumerate(hits, start=1):
        short = hit.id if len(hit.id) <= 16 else hit.id[:12] + "..."
        flag = f"  (predicted, p={hit.confidence.get(next(reversed(hit.categories)), 0):.2f})" if hit.predicted else ""
        lines.append(f"  {rank:>3}  {hit.distance:>9.4f}  {hit.category or '':<{width}}  {short}  {hit.uri}{flag}")
    return "\n".join(lines)


def hit_dict(hit) -> dict:
    return {"id": hit.id, "distance": hit.distance, "uri": hit.uri, "category": hit.category,
            "categories": hit.categories, "meta": hit.meta, "predicted": hit.predicted, "confidence": hit.confidence}


def _thumbnail(source, size: int) -> Image.Image:
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            return ImageOps.pad(image, (size, size), color=(255, 255, 255))
    except (OSError, ValueError):
        placeholder = Image.new("RGB", (size, size), (220, 220, 220))
        ImageDraw.Draw(placeholder).text((6, size // 2 - 6), "not found", fill=(90, 90, 90))
        return placeholder


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` fitted to `width` pixels: a path loses whole leading names first
    (``footwear/boots/ankle-boot`` -> ``boots/ankle-boot``), then characters."""
    names = text.split("/")
    for start in range(len(names)):
        candidate = "/".join(names[start:])
        if draw.textlength(candidate, font=font) <= width:
            return candidate
    text = names[-1]
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(rows: Sequence[tuple[str, Sequence]], out: str | Path, *, thumb: int = 112) -> Path:
    """One row per query: the query image, then its hits captioned with category path and distance."""
    font = ImageFont.load_default(size=11)
    pad, caption = 8, 30
    columns = 1 + max((len(hits) for _, hits in rows), default=0)
    sheet = Image.new("RGB", (pad + columns * (thumb + pad), pad + len(rows) * (thumb + caption + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (query, hits) in enumerate(rows):
        y = pad + r * (thumb + caption + pad)
        cells = [(query, "query", Path(str(query)).name)] + [
            (hit.uri, hit.category or hit.id, f"d={hit.distance:.3f}") for hit in hits
        ]
        for c, (source, line1, line2) in enumerate(cells):
            x = pad + c * (thumb + pad)
            sheet.paste(_thumbnail(source, thumb), (x, y))
            if c == 0:
                draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + 1], outline=(30, 90, 200), width=2)
            draw.text((x, y + thumb + 3), _fit(draw, line1, font, thumb), fill=(20, 20, 20), font=font)
            draw.text((x, y + thumb + 16), _fit(draw, line2, font, thumb), fill=(90, 90, 90), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
