"""Draws the DeepScope kernel logos: logo-32x32.png, logo-64x64.png and
logo-svg.svg (JupyterLab's launcher prefers the SVG).

A magnifying lens over a 3x3 grid of expert cells; the experts the router
picked (top-k) are coloured, the others are grey; outside the lens the grid is
faded. Standard library only (the
PNGs are written with zlib + struct), so it runs with any python3:

    python3 kernelspec/make_logos.py            # writes next to this script
    python3 kernelspec/make_logos.py OUT_DIR
"""
import math
import os
import struct
import sys
import zlib

SUPERSAMPLE = 6  # samples per pixel along each axis (antialiasing)

# Colours (r, g, b)
GREY = (203, 210, 220)
ORANGE = (243, 118, 38)  # Jupyter orange
TEAL = (22, 160, 160)
BLUE = (52, 101, 190)
NAVY = (24, 39, 74)

# 3x3 grid of experts; the ones the router chose get a colour.
GRID = 3
CHOSEN = {(1, 1): ORANGE, (0, 2): TEAL, (2, 0): BLUE}

# Geometry in a unit square (0..1, y down).
GRID_X0, GRID_Y0, GRID_SIZE = 0.04, 0.04, 0.72
CELL_GAP = 0.05
LENS_C, LENS_R, LENS_W = (0.40, 0.40), 0.25, 0.08  # centre, radius of the ring's middle, ring width
HANDLE_FROM, HANDLE_TO, HANDLE_W = 0.60, 0.91, 0.12  # along the diagonal, width
OUTLINE = 0.03


def rounded_box(px, py, x0, y0, x1, y1, r):
    """Signed distance to a rounded rectangle (negative inside)."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = (x1 - x0) / 2 - r, (y1 - y0) / 2 - r
    dx, dy = abs(px - cx) - hx, abs(py - cy) - hy
    outside = math.hypot(max(dx, 0.0), max(dy, 0.0))
    inside = min(max(dx, dy), 0.0)
    return outside + inside - r


def segment(px, py, ax, ay, bx, by):
    """Distance to the segment a-b."""
    vx, vy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy)))
    return math.hypot(px - ax - t * vx, py - ay - t * vy)


def sample(px, py):
    """Colour (r, g, b, a) of the logo at one point of the unit square."""
    d_lens = math.hypot(px - LENS_C[0], py - LENS_C[1])
    # lens ring and handle on top
    d_ring = abs(d_lens - LENS_R) - LENS_W / 2
    d_handle = segment(px, py, HANDLE_FROM, HANDLE_FROM, HANDLE_TO, HANDLE_TO) - HANDLE_W / 2
    if min(d_ring, d_handle) <= 0:
        return NAVY + (255,)
    if min(d_ring, d_handle) <= OUTLINE:
        return (255, 255, 255, 255)  # thin light edge: the lens stays visible on dark themes
    inside_lens = d_lens < LENS_R
    # expert cells
    cell = (GRID_SIZE - (GRID - 1) * CELL_GAP) / GRID
    for i in range(GRID):
        for j in range(GRID):
            x0 = GRID_X0 + j * (cell + CELL_GAP)
            y0 = GRID_Y0 + i * (cell + CELL_GAP)
            if rounded_box(px, py, x0, y0, x0 + cell, y0 + cell, cell * 0.22) <= 0:
                rgb = CHOSEN.get((i, j), GREY)
                if not inside_lens:
                    # outside the lens the grid is faded
                    return rgb + (120,)
                return rgb + (255,)
    if inside_lens:
        return (255, 255, 255, 215)  # the glass
    return (0, 0, 0, 0)


def render(size):
    rows = []
    n = SUPERSAMPLE
    for y in range(size):
        row = bytearray([0])  # PNG filter type 0 for this scanline
        for x in range(size):
            acc = [0.0, 0.0, 0.0, 0.0]
            for sy in range(n):
                for sx in range(n):
                    r, g, b, a = sample((x + (sx + 0.5) / n) / size, (y + (sy + 0.5) / n) / size)
                    acc[0] += r * a
                    acc[1] += g * a
                    acc[2] += b * a
                    acc[3] += a
            alpha = acc[3] / (n * n)
            if acc[3] > 0:
                rgb = [round(c / acc[3]) for c in acc[:3]]
            else:
                rgb = [0, 0, 0]
            row += bytes(rgb + [round(alpha)])
        rows.append(bytes(row))
    return b"".join(rows)


def png(size, raw):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def svg():
    """The same drawing as vector shapes (64 x 64 user units)."""
    k = 64.0

    def f(v):
        return f"{v * k:.2f}".rstrip("0").rstrip(".")

    def hexc(rgb):
        return "#%02x%02x%02x" % rgb

    cell = (GRID_SIZE - (GRID - 1) * CELL_GAP) / GRID
    cells = []
    for i in range(GRID):
        for j in range(GRID):
            x0 = GRID_X0 + j * (cell + CELL_GAP)
            y0 = GRID_Y0 + i * (cell + CELL_GAP)
            cells.append(f'<rect x="{f(x0)}" y="{f(y0)}" width="{f(cell)}" height="{f(cell)}" rx="{f(cell * 0.22)}" '
                         f'fill="{hexc(CHOSEN.get((i, j), GREY))}"/>')
    grid = "".join(cells)
    cx, cy = f(LENS_C[0]), f(LENS_C[1])
    a, b = f(HANDLE_FROM), f(HANDLE_TO)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">'
        f'<defs><clipPath id="lens"><circle cx="{cx}" cy="{cy}" r="{f(LENS_R)}"/></clipPath></defs>'
        f'<g opacity="{120 / 255:.3f}">{grid}</g>'
        f'<circle cx="{cx}" cy="{cy}" r="{f(LENS_R)}" fill="#ffffff" fill-opacity="{215 / 255:.3f}"/>'
        f'<g clip-path="url(#lens)">{grid}</g>'
        f'<g fill="none" stroke="#ffffff">'
        f'<circle cx="{cx}" cy="{cy}" r="{f(LENS_R)}" stroke-width="{f(LENS_W + 2 * OUTLINE)}"/>'
        f'<line x1="{a}" y1="{a}" x2="{b}" y2="{b}" stroke-width="{f(HANDLE_W + 2 * OUTLINE)}" stroke-linecap="round"/></g>'
        f'<g fill="none" stroke="{hexc(NAVY)}">'
        f'<circle cx="{cx}" cy="{cy}" r="{f(LENS_R)}" stroke-width="{f(LENS_W)}"/>'
        f'<line x1="{a}" y1="{a}" x2="{b}" y2="{b}" stroke-width="{f(HANDLE_W)}" stroke-linecap="round"/></g>'
        f'</svg>\n'
    )


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out, exist_ok=True)
    for size in (32, 64):
        path = os.path.join(out, f"logo-{size}x{size}.png")
        with open(path, "wb") as f:
            f.write(png(size, render(size)))
        print(path)
    path = os.path.join(out, "logo-svg.svg")
    with open(path, "w") as f:
        f.write(svg())
    print(path)


if __name__ == "__main__":
    main()
