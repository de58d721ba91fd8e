"""The Streamlit web app: search the catalog from a photo, pick the shoe, browse similar products.

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

from lookalike.errors import LookalikeError
from lookalike.pipeline import Box, BoxChoice, Catalog, ImageSource, Query, SearchResult

AUTO, WHOLE, OWN = "Automatic (the pair / best box)", "Whole image", "My own box"
COLUMNS = 4


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


def box_choice(query: Query) -> BoxChoice:
    options = [AUTO] + [f"Box {n}: {b.label} {b.score:.2f}" for n, b in enumerate(query.boxes, 1)] + [WHOLE, OWN]
    if not query.boxes:
        st.info("No shoe was detected: searching the non-white area, the whole image, or a box you draw.")
    if st.session_state.pop("reset_box", False):
        st.session_state["box_choice"] = AUTO
        for key in ("own_x1", "own_y1", "own_x2", "own_y2"):
            st.session_state.pop(key, None)
    choice = st.radio("Search with", options, key="box_choice", horizontal=True)
    if choice == AUTO:
        return BoxChoice()
    if choice == WHOLE:
        return BoxChoice.whole()
    if choice == OWN:
        w, h = query.image.size
        c1, c2, c3, c4 = st.columns(4)
        x1 = c1.number_input("left", 0, w - 1, 0, key="own_x1")
        y1 = c2.number_input("top", 0, h - 1, 0, key="own_y1")
        x2 = c3.number_input("right", 1, w, w, key="own_x2")
        y2 = c4.number_input("bottom", 1, h, h, key="own_y2")
        return BoxChoice.manual(x1, y1, x2, y2)
    return BoxChoice.detected(options.index(choice) - 1)


def filters(cat: Catalog) -> dict[str, str] | None:
    where = {}
    for key, values in cat.metadata_values().items():
        if len(values) < 2:
            continue
        value = st.sidebar.selectbox(key, ["(any)", *values], key=f"filter_{key}")
        if value != "(any)":
            where[key] = value
    return where or None


def card(rank: int, match) -> str:
    meta = match.metadata
    name = meta.get("name") or meta.get("productDisplayName") or match.product_id
    details = " · ".join(
        html.escape(str(meta[k])) for k in ("brand", "colour", "color", "baseColour", "price") if k in meta
    )
    link = meta.get("url") or meta.get("link")
    link_html = f' · <a href="{html.escape(str(link))}" target="_blank">open</a>' if link else ""
    return (
        f'<div class="lookalike-card" data-rank="{rank}" data-product="{html.escape(match.product_id)}">'
        f"<b>{rank}. {html.escape(str(name))}</b><br>"
        f"{'' if name == match.product_id else f'<code>{html.escape(match.product_id)}</code> · '}"
        f"score {match.score:.3f}"
        f"{'<br>' + details if details else ''}{link_html}</div>"
    )


def show_results(cat: Catalog, result: SearchResult) -> None:
    q = result.query
    used = f" box {q.box_used.x1:.0f},{q.box_used.y1:.0f}–{q.box_used.x2:.0f},{q.box_used.y2:.0f}" if q.box_used else ""
    if "similar" in st.session_state:
        st.caption(f"Search took {q.took_ms:.0f} ms · more like **{st.session_state['similar']}** (its stored vectors)")
    else:
        st.caption(
            f"Search took {q.took_ms:.0f} ms · {len(q.boxes)} shoe box(es) detected · searched with the "
            f"**{q.crop}** crop{used}"
        )
    if result.no_match:
        st.warning("No close match: nothing in this catalog looks like this photo (is there a shoe in it?). "
                   "Try another photo, or draw a box around the shoe.")  # fmt: skip
    elif not result.results:
        st.warning("No product matches these filters.")
    cols = st.columns(COLUMNS)
    for rank, match in enumerate(result.results, 1):
        with cols[(rank - 1) % COLUMNS]:
            try:
                st.image(match.image, width="stretch")
            except Exception:  # a catalog image moved or unreachable: still show the card
                st.caption("(image unavailable)")
            st.markdown(card(rank, match), unsafe_allow_html=True)
            if st.button("More like this", key=f"more_{rank}"):  # the product's stored vectors, no photo
                st.session_state["similar"] = match.product_id
                st.rerun()


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
    where = filters(cat)
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
        try:
            result = cat.search(query, k=k, where=where, box=box)
        except LookalikeError as e:
            st.error(str(e))
            return
        st.image(
            draw_boxes(query.image, query.boxes, result.query.box_used),
            caption=st.session_state["query_name"],
            width="stretch",
        )
    with right:
        show_results(cat, result)


if __name__ == "__main__":
    main()
