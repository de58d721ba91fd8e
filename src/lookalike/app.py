"""The Streamlit web app: search the catalog from a photo, point at the shoe (click a detected box or
drag one of your own on the photo), browse similar products.

Start with `lookalike app --catalog DIR`, or `streamlit run src/lookalike/app.py -- --catalog DIR`
(or set LOOKALIKE_CATALOG). It calls the pipeline (`Catalog`) only.
"""

from __future__ import annotations

import argparse
import html
import os
import sys

import streamlit as st
from PIL import Image, ImageDraw, ImageFont
from streamlit_image_coordinates import streamlit_image_coordinates

from lookalike.errors import LookalikeError
from lookalike.pipeline import Box, BoxChoice, Catalog, ImageSource, Query, SearchResult, thumbnail_uri

# Streamlit runs this file as a script, with its own folder first on sys.path: there `import onnx` (the
# model fingerprint reads graphs with it) would find lookalike/onnx.py instead of the onnx package.
# lookalike's modules are imported by their full names, so the folder has no business on the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

AUTO, WHOLE, OWN = "Automatic (the pair / best box)", "Whole image", "My own box"
COLUMNS = 4
CLICK_PX = 6  # a press and release this close (in displayed pixels) is a click, not a drawn box
SHOWN_PX = 900  # the photo is sent to the browser at most this wide or high (clicks are scaled back)
ANYWAY = -1.0  # "closest products anyway": every result, whatever its score
GROUP_KEY = "item_group_id"  # a feed's variants of one model (Merchant Center): "one result per model"
CARD_CSS = """<style>
.lookalike-card {min-height: 18.5rem; display: flex; flex-direction: column; gap: .25rem; overflow: hidden;
  border: 1px solid rgba(128, 128, 128, .3); border-radius: .5rem; padding: .5rem; margin-bottom: .4rem}
.lookalike-card img {width: 100%; height: 12rem; object-fit: contain; background: #fff; border-radius: .3rem}
.lookalike-card .name {font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis}
.lookalike-card .meta {font-size: .85rem; opacity: .8; overflow-wrap: anywhere}
.lookalike-card .noimage {height: 12rem; display: flex; align-items: center; justify-content: center; opacity: .6}
</style>"""


def catalog_dir() -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--catalog")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.catalog or os.environ.get("LOOKALIKE_CATALOG")


@st.cache_resource(show_spinner="Loading the catalog and models…")
def open_catalog(directory: str) -> Catalog:
    """Once per process: every session shares the catalog and its loaded models."""
    cat = Catalog.open(directory)
    cat.warm_up()
    return cat


def draw_boxes(img: Image.Image, boxes: list[Box], used: Box | None) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(img.size) / 200))
    font = ImageFont.load_default(size=max(10, round(max(img.size) / 28)))
    for n, b in enumerate(boxes, 1):
        colour = "#f59e0b"
        draw.rectangle([b.x1, b.y1, b.x2, b.y2], outline=colour, width=width)
        label = f"{n} {b.label} {b.score:.2f}"
        tx, ty = b.x1 + width, b.y1 + width
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=colour)
        draw.text((tx, ty), label, fill="black", font=font)
    if used is not None:
        draw.rectangle([used.x1, used.y1, used.x2, used.y2], outline="#16a34a", width=width + 1)
    return out


def set_query(cat: Catalog, source, name: str) -> None:
    """Load (guarded: limits, no private URLs) and detect once; kept for the session's reruns."""
    try:
        query = cat.detect(source)
    except LookalikeError as e:
        st.session_state.pop("query", None)
        st.session_state["load_error"] = str(e)
        return
    st.session_state.pop("load_error", None)
    st.session_state.pop("similar", None)  # a new photo ends a "more like this"
    st.session_state["reset_box"] = True  # a new photo starts with the automatic box
    st.session_state["query"] = query
    st.session_state["query_name"] = name


def query_inputs(cat: Catalog) -> None:
    upload, camera, url, examples = st.tabs(["Upload", "Camera", "Image URL", "Try an example"])
    with upload:
        file = st.file_uploader("A photo of a shoe", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"])
        if file is not None and st.session_state.get("upload_id") != file.file_id:
            st.session_state["upload_id"] = file.file_id
            set_query(cat, file.getvalue(), file.name)
    with camera:
        shot = st.camera_input("Take a photo")
        if shot is not None and st.session_state.get("camera_id") != shot.file_id:
            st.session_state["camera_id"] = shot.file_id
            set_query(cat, shot.getvalue(), "camera photo")
    with url:
        with st.form("url_form", border=False):
            address = st.text_input("Image URL", placeholder="https://…/shoe.jpg", key="url")
            if st.form_submit_button("Search this URL") and address.strip():
                address = address.strip()
                try:  # a URL only: a bare string would be read as a path on the server
                    set_query(cat, ImageSource.url(address), address)
                except LookalikeError as e:
                    st.session_state["load_error"] = str(e)
    with examples:
        picks = cat.examples(COLUMNS * 2)
        cols = st.columns(COLUMNS)
        for n, (product_id, image) in enumerate(picks):
            with cols[n % COLUMNS]:
                st.image(image, caption=product_id, width="stretch")
                if st.button("Search with this", key=f"example_{n}"):
                    set_query(cat, image, image)


def box_options(query: Query) -> list[str]:
    return [AUTO] + [f"Box {n}: {b.label} {b.score:.2f}" for n, b in enumerate(query.boxes, 1)] + [WHOLE, OWN]


def pointed(event: dict, size: tuple[int, int], boxes: list[Box]) -> tuple[str, object] | None:
    """What a press and release on the shown photo means, in the photo's pixels: ("box", index) for a
    click inside detected boxes (the smallest holding the point), ("own", (x1, y1, x2, y2)) for a
    drag, None for a click outside every box. `event` is streamlit-image-coordinates' click-and-drag
    value (displayed pixels, and the displayed width and height)."""
    w, h = size
    sx, sy = w / max(event["width"], 1), h / max(event["height"], 1)
    x1, x2 = sorted((event["x1"], event["x2"]))
    y1, y2 = sorted((event["y1"], event["y2"]))
    if x2 - x1 < CLICK_PX and y2 - y1 < CLICK_PX:
        x, y = (x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy
        inside = [((b.x2 - b.x1) * (b.y2 - b.y1), n) for n, b in enumerate(boxes)
                  if b.x1 <= x <= b.x2 and b.y1 <= y <= b.y2]  # fmt: skip
        return ("box", min(inside)[1]) if inside else None
    clamp = lambda v, hi: int(round(min(max(v, 0), hi)))  # noqa: E731  (a drag may end outside the photo)
    return "own", (clamp(x1 * sx, w - 1), clamp(y1 * sy, h - 1), max(clamp(x2 * sx, w), clamp(x1 * sx, w - 1) + 1),
                   max(clamp(y2 * sy, h), clamp(y1 * sy, h - 1) + 1))  # fmt: skip


def follow_pointer(query: Query, options: list[str]) -> None:
    """Apply the last click or drag on the photo to the box controls, before they are drawn."""
    event = st.session_state.get("photo")
    if not event or "x1" not in event or event.get("unix_time") == st.session_state.get("photo_seen"):
        return
    st.session_state["photo_seen"] = event.get("unix_time")
    what = pointed(event, query.image.size, query.boxes)
    if what is None:
        st.session_state["pointer_hint"] = "That point is in no detected box: drag across the shoe to draw a box."
    elif what[0] == "box":
        st.session_state["box_choice"] = options[what[1] + 1]
    else:
        st.session_state["box_choice"] = OWN
        for key, value in zip(("own_x1", "own_y1", "own_x2", "own_y2"), what[1], strict=True):
            st.session_state[key] = value


def box_choice(query: Query) -> BoxChoice:
    options = box_options(query)
    if not query.boxes:
        st.info("No shoe was detected: searching the non-white area, the whole image, or a box you draw "
                "(drag across the shoe on the photo).")  # fmt: skip
    if st.session_state.pop("reset_box", False):
        st.session_state["box_choice"] = AUTO
        for key in ("own_x1", "own_y1", "own_x2", "own_y2", "every_shoe"):
            st.session_state.pop(key, None)
        st.session_state["photo_seen"] = (st.session_state.get("photo") or {}).get("unix_time")
    follow_pointer(query, options)
    choice = st.radio("Search with", options, key="box_choice", horizontal=True)
    if choice == AUTO:
        return BoxChoice()
    if choice == WHOLE:
        return BoxChoice.whole()
    if choice == OWN:
        w, h = query.image.size
        for key, value in (("own_x1", 0), ("own_y1", 0), ("own_x2", w), ("own_y2", h)):
            st.session_state.setdefault(key, value)
        c1, c2, c3, c4 = st.columns(4)
        x1 = c1.number_input("left", 0, w - 1, key="own_x1")
        y1 = c2.number_input("top", 0, h - 1, key="own_y1")
        x2 = c3.number_input("right", 1, w, key="own_x2")
        y2 = c4.number_input("bottom", 1, h, key="own_y2")
        return BoxChoice.manual(x1, y1, x2, y2)
    return BoxChoice.detected(options.index(choice) - 1)


def show_photo(query: Query, used: Box | None) -> None:
    """The photo with its boxes; a click on a box or a drag across the shoe chooses what is searched."""
    shown = draw_boxes(query.image, query.boxes, used)
    shown.thumbnail((SHOWN_PX, SHOWN_PX))
    streamlit_image_coordinates(shown.convert("RGB"), key="photo", width="stretch", click_and_drag=True,
                                image_format="JPEG", jpeg_quality=85, cursor="crosshair")  # fmt: skip
    hint = st.session_state.pop("pointer_hint", None)
    st.caption(hint or f"{st.session_state['query_name']} · click a box, or drag across a shoe to draw one")


def filters(cat: Catalog) -> tuple[dict[str, str] | None, str | None]:
    """The sidebar's filters (a choice per listed key, a range per numeric one, a price with its currency)
    and the collapse toggle, as (where, collapse)."""
    where = {}
    menus = cat.metadata_values()
    currency = menus.get("currency")
    for key, menu in menus.items():
        if isinstance(menu, tuple):
            low, high = float(menu[0]), float(menu[1])
            unit = f" ({currency[0]})" if key == "price" and isinstance(currency, list) and len(currency) == 1 else ""
            chosen = st.sidebar.slider(f"{key}{unit}", low, high, (low, high), key=f"filter_{key}")
            if tuple(chosen) != (low, high):
                where[key] = f"{chosen[0]}..{chosen[1]}"
        elif len(menu) >= 2:
            value = st.sidebar.selectbox(key, ["(any)", *menu], key=f"filter_{key}")
            if value != "(any)":
                where[key] = value
    collapse = GROUP_KEY in menus and st.sidebar.checkbox(
        "One result per model", key="collapse", help=f"the best of each model's variants (same {GROUP_KEY})"
    )
    return where or None, GROUP_KEY if collapse else None


def thumbnail(image: str) -> str | None:
    """A catalog image for a card: its URL as it is, a local file as a small JPEG data URI (so every
    card is the same size whatever the photo); None when it cannot be read (moved, removed)."""
    if image.startswith(("http://", "https://")):
        return image
    try:
        changed = os.stat(image).st_mtime_ns  # a file replaced at the same path is shown anew
    except OSError:
        return None
    return _thumbnail(image, changed)


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumbnail(image: str, changed: int) -> str | None:
    return thumbnail_uri(image, 360)


def card(rank: int, match, row: str = "") -> str:
    """One result: the matched catalog image at a fixed height, the product's name, brand, price and
    link from its metadata when it has them, and the score."""
    meta = match.metadata
    name = meta.get("name") or meta.get("title") or meta.get("productDisplayName") or match.product_id
    shown = {k: match.shown(k) for k in meta}
    if "price" in meta:
        shown["price"] = f"{meta['price']} {meta.get('currency', '')}".strip()
    details = " · ".join(
        html.escape(shown[k]) for k in ("brand", "category", "colour", "color", "baseColour", "price") if k in meta
    )
    link = meta.get("url") or meta.get("link")
    link_html = f' · <a href="{html.escape(str(link))}" target="_blank">open</a>' if link else ""
    src = thumbnail(match.image)
    picture = (f'<img src="{html.escape(src)}" alt="{html.escape(match.product_id)}">' if src
               else '<div class="noimage">(image unavailable)</div>')  # fmt: skip
    return (
        f'<div class="lookalike-card" data-rank="{rank}" data-product="{html.escape(match.product_id)}"'
        f' data-score="{match.score:.4f}" data-row="{html.escape(row)}">{picture}'
        f'<div class="name" title="{html.escape(str(name))}">{rank}. {html.escape(str(name))}</div>'
        f'<div class="meta">{"" if name == match.product_id else f"<code>{html.escape(match.product_id)}</code> · "}'
        f"score {match.score:.3f}{'<br>' + details if details else ''}{link_html}</div></div>"
    )


def show_results(cat: Catalog, result: SearchResult, row: str = "", columns: int = COLUMNS) -> None:
    """The result cards in a grid; `row` keeps the buttons of several shoes' rows apart."""
    q = result.query
    used = f" box {q.box_used.x1:.0f},{q.box_used.y1:.0f}–{q.box_used.x2:.0f},{q.box_used.y2:.0f}" if q.box_used else ""
    if "similar" in st.session_state:
        st.caption(f"Search took {q.took_ms:.0f} ms · more like **{st.session_state['similar']}** (its stored vectors)")
    else:
        st.caption(
            f"Search took {q.took_ms:.0f} ms · {len(q.boxes)} shoe box(es) detected · searched with the "
            f"**{q.crop}** crop{used}"
        )
    if result.no_match and result.results:
        st.warning("No close match: these are the closest products anyway (each scores under this catalog's "
                   f"threshold for unrelated photos, {result.threshold:.3f}).")  # fmt: skip
    elif result.no_match:
        st.warning("No close match: nothing in this catalog looks like this photo (is there a shoe in it?). "
                   "Try another photo, draw a box around the shoe, or tick 'Closest products anyway'.")  # fmt: skip
    elif not result.results:
        st.warning("No product matches these filters.")
    cols = st.columns(columns)
    for rank, match in enumerate(result.results, 1):
        with cols[(rank - 1) % columns]:
            st.markdown(card(rank, match, row), unsafe_allow_html=True)
            if st.button("More like this", key=f"more_{row}{rank}"):  # the product's stored vectors, no photo
                st.session_state["similar"] = match.product_id
                st.rerun()
            if "similar" not in st.session_state and st.button("This is it", key=f"this_{row}{rank}"):
                this_is_it(cat, result, match.product_id)


def this_is_it(cat: Catalog, result: SearchResult, product_id: str) -> None:
    """The shopper's confirmation, kept as a click on this search when the catalog keeps its searches."""
    if result.search_id is None:
        st.toast("Thanks. (Not recorded: this catalog's search log is off.)")
        return
    try:
        cat.feedback(result.search_id, product_id, "click")
        st.toast(f"Thanks: {product_id} recorded as the shoe in this photo.")
    except LookalikeError as e:
        st.toast(str(e))


def logged_search(cat: Catalog, query: Query, **asked) -> SearchResult:
    """A search, kept by the search log (when on) once: Streamlit runs the page again on every click,
    and the same search run again keeps its first search_id rather than logging a copy."""
    if st.session_state.get("logged_for") != id(query):  # only this photo's searches are remembered
        st.session_state["logged_for"], st.session_state["logged"] = id(query), {}
    key = repr(sorted((k, repr(v)) for k, v in asked.items()))
    logged = st.session_state["logged"]
    result = cat.search(query, **asked, log=key not in logged)
    if key in logged:
        result.search_id = logged[key]
    elif result.search_id is not None:
        logged[key] = result.search_id
    return result


def show_every_shoe(cat: Catalog, query: Query, k: int, where: dict | None, **asked) -> None:
    """One row of results per detected shoe (`asked`: min_score, collapse)."""
    for n, box in enumerate(query.boxes):
        st.markdown(f"**Shoe {n + 1}** · {html.escape(box.label)} {box.score:.2f}")
        try:
            result = logged_search(cat, query, k=min(k, 2 * COLUMNS), where=where, box=BoxChoice.detected(n),
                                   **asked)  # fmt: skip
        except LookalikeError as e:
            st.error(str(e))
            continue
        show_results(cat, result, row=f"shoe{n}_", columns=2 * COLUMNS)


def show_similar(cat: Catalog, k: int, where: dict | None) -> None:
    """More like a catalog product: its images on the left, the products nearest it on the right."""
    product_id = st.session_state["similar"]
    left, right = st.columns([1, 3])
    with left:
        product = cat.product(product_id)
        if product is None:  # removed meanwhile
            st.session_state.pop("similar")
            st.rerun()
        st.markdown(f"**More like {html.escape(product_id)}**")
        for image in product["images"][:3]:
            try:
                st.image(image, width="stretch")
            except Exception:
                st.caption("(image unavailable)")
        if st.button("Back", key="similar_back"):
            st.session_state.pop("similar")
            st.rerun()
    with right:
        show_results(cat, cat.similar(product_id, k=k, where=where))


def main() -> None:
    st.set_page_config(page_title="lookalike", page_icon="👟", layout="wide")
    st.title("lookalike · visual shoe search")
    st.markdown(CARD_CSS, unsafe_allow_html=True)
    directory = catalog_dir()
    if not directory:
        st.error("No catalog given: start with `lookalike app --catalog DIR` (or set LOOKALIKE_CATALOG).")
        return
    try:
        cat = open_catalog(directory)
    except LookalikeError as e:
        st.error(str(e))
        return
    info = cat.info()
    st.sidebar.markdown(f"**Catalog** `{directory}`  \n{info['products']} products · {info['images']} images")
    if info["images"] == 0:
        st.warning(f"The catalog is empty: add images with `lookalike index SOURCE --catalog {directory}`.")
        return
    k = st.sidebar.slider("Results (k)", 1, 48, 12, key="k")
    anyway = st.sidebar.checkbox("Closest products anyway", key="anyway",
                                 help="show results even when nothing scores above the catalog's no-close-match "
                                      "threshold (it is still said)")  # fmt: skip
    where, collapse = filters(cat)
    asked = {"min_score": ANYWAY if anyway else None, "collapse": collapse}
    query_inputs(cat)
    if "load_error" in st.session_state:
        st.error(st.session_state["load_error"])
    if "similar" in st.session_state:
        show_similar(cat, k, where)
        return
    query: Query | None = st.session_state.get("query")
    if query is None:
        st.info("Give a photo of a shoe: upload one, take one, paste an image URL, or try an example.")
        return
    left, right = st.columns([1, 3])
    with left:
        box = box_choice(query)
        every = len(query.boxes) > 1 and st.checkbox(f"Search every shoe ({len(query.boxes)}), a row each",
                                                     key="every_shoe")  # fmt: skip
        try:
            result = None if every else logged_search(cat, query, k=k, where=where, box=box, **asked)
        except LookalikeError as e:
            st.error(str(e))
            return
        show_photo(query, None if result is None else result.query.box_used)
    with right:
        if result is None:
            show_every_shoe(cat, query, k, where, **asked)
        else:
            show_results(cat, result)


if __name__ == "__main__":
    main()
