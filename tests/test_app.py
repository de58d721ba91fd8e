"""The Streamlit app's logic, with Streamlit's AppTest (no browser), on real catalogs and models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lookalike import Catalog
from lookalike.app import AUTO

APP = str(Path(__file__).resolve().parents[1] / "src" / "lookalike" / "app.py")


def start(monkeypatch, catalog) -> AppTest:
    monkeypatch.setenv("LOOKALIKE_CATALOG", str(catalog))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def cards(at: AppTest) -> list[tuple[int, str]]:
    found = []
    for m in at.markdown:
        hit = re.search(r'class="lookalike-card" data-rank="(\d+)" data-product="([^"]+)"', m.value)
        if hit:
            found.append((int(hit.group(1)), hit.group(2)))
    return sorted(found)


def test_example_search_shows_ranked_results(monkeypatch, sneaker_catalog):
    at = start(monkeypatch, sneaker_catalog)
    assert "Give a photo of a shoe" in at.info[0].value
    with Catalog.open(sneaker_catalog) as cat:
        examples = cat.examples(8)
    at.button(key="example_2").click().run()
    assert not at.exception and not at.error
    found = cards(at)
    assert [r for r, _ in found] == list(range(1, 13))  # default k = 12
    assert found[0][1] == examples[2][0]  # a catalog image finds its own product first
    caption = next(c.value for c in at.caption if c.value.startswith("Search took"))
    assert "detector" in caption or "nonwhite" in caption

    at.slider(key="k").set_value(5).run()
    assert len(cards(at)) == 5
    at.radio(key="box_choice").set_value("Whole image").run()
    assert any("**whole** crop" in c.value for c in at.caption)

    at.radio(key="box_choice").set_value("My own box").run()
    at.number_input(key="own_x2").set_value(20).run()
    at.number_input(key="own_y2").set_value(20).run()
    assert any("**manual** crop box 0,0–20,20" in c.value for c in at.caption)

    # "More like this" on the 3rd result searches with that product's stored vectors: it is left out
    at.radio(key="box_choice").set_value(AUTO).run()  # (a 20-pixel box matches nothing close)
    third = cards(at)[2][1]
    at.button(key="more_3").click().run()
    assert not at.exception
    with Catalog.open(sneaker_catalog) as cat:
        expected = [m.product_id for m in cat.similar(third, k=5).results]
    assert [p for _, p in cards(at)] == expected and third not in expected
    assert any(f"more like **{third}**" in c.value for c in at.caption)
    at.button(key="similar_back").click().run()
    assert any("shoe box(es) detected" in c.value for c in at.caption)  # back to the photo's search


def test_filters_from_metadata(monkeypatch, branded_catalog):
    at = start(monkeypatch, branded_catalog)
    at.selectbox(key="filter_brand").select("Nike").run()
    at.button(key="example_0").click().run()
    found = cards(at)
    assert len(found) == 3  # three Nike products in the catalog
    texts = [m.value for m in at.markdown if 'class="lookalike-card"' in m.value]
    assert all("Nike" in t and "https://shop.example/" in t for t in texts)
    # a number is a range (the branded catalog's prices are 0, 10, ... 50); a link is no filter
    assert at.slider(key="filter_price").value == (0.0, 50.0) and "filter_url" not in [w.key for w in at.selectbox]
    at.selectbox(key="filter_brand").select("(any)").run()
    at.slider(key="filter_price").set_value((15.0, 50.0)).run()
    texts = [m.value for m in at.markdown if 'class="lookalike-card"' in m.value]
    assert len(texts) == 4 and all(f" · {price}" not in t for t in texts for price in (0, 10))


def test_refused_url_is_a_clear_message(monkeypatch, sneaker_catalog):
    at = start(monkeypatch, sneaker_catalog)
    at.text_input(key="url").input("http://127.0.0.1:9/shoe.jpg")
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    assert any("non-public address" in e.value for e in at.error)
    assert not cards(at)
    at.text_input(key="url").input("/etc/passwd")
    at.button[0].click().run()
    assert any("only http:// and https://" in e.value for e in at.error)


def test_no_catalog_and_empty_catalog(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path / "nowhere")
    assert "no catalog here" in at.error[0].value
    Catalog.open(tmp_path / "empty", create=True).close()
    at = start(monkeypatch, tmp_path / "empty")
    assert "catalog is empty" in at.warning[0].value


@pytest.mark.parametrize("missing", ["models"])
def test_missing_model_message(monkeypatch, tmp_path, branded_catalog, missing):
    monkeypatch.setenv("LOOKALIKE_MODEL_DIR", str(tmp_path / "no-models"))
    # a catalog path the cache has not seen, so the app really opens it with no models
    link = tmp_path / "cat"
    link.symlink_to(branded_catalog)
    at = start(monkeypatch, link)
    assert "lookalike models pull" in at.error[0].value


def test_a_click_picks_the_smallest_box_under_it_and_a_drag_draws_one():
    from lookalike.app import pointed
    from lookalike.pipeline import Box

    boxes = [Box(0, 0, 100, 100, 0.9, "shoe"), Box(40, 40, 60, 60, 0.5, "shoe"), Box(150, 0, 200, 50, 0.7, "shoe")]
    shown = {"width": 100, "height": 50}  # a 200x100 photo shown at half size
    click = lambda x, y: {**shown, "x1": x, "y1": y, "x2": x + 1, "y2": y}  # noqa: E731
    assert pointed(click(25, 25), (200, 100), boxes) == ("box", 1)  # (50, 50): inside boxes 0 and 1
    assert pointed(click(5, 5), (200, 100), boxes) == ("box", 0)
    assert pointed(click(90, 10), (200, 100), boxes) == ("box", 2)
    assert pointed(click(60, 40), (200, 100), boxes) is None  # (120, 80): in no box
    # a drag, released outside the photo and towards the top left: a box in the photo's pixels
    assert pointed({**shown, "x1": 80, "y1": 40, "x2": 130, "y2": -5}, (200, 100), boxes) == ("own", (160, 0, 200, 80))


def test_this_is_it_records_a_click_once_per_search(monkeypatch, tmp_path, branded_catalog):
    import shutil

    catalog = tmp_path / "cat"
    shutil.copytree(branded_catalog, catalog)
    at = start(monkeypatch, catalog)
    at.button(key="example_0").click().run()
    at.button(key="this_1").click().run()
    assert not at.exception and "Not recorded" in at.toast[0].value  # the log is off: nothing kept
    assert not (catalog / "searches.db").exists()

    with Catalog.open(catalog, check_models=False) as cat:
        cat.log.keep(7)
    at = start(monkeypatch, catalog)
    at.button(key="example_1").click().run()
    first = cards(at)[0][1]
    at.slider(key="k").set_value(3).run()  # a new search: logged
    at.button(key="this_1").click().run()  # the page runs again: the same search, not logged twice
    assert not at.exception and first in at.toast[0].value
    with Catalog.open(catalog, check_models=False) as cat:
        kept = cat.log.searches()
    assert [len(s["results"]) for s in kept] == [6, 3]  # k=12 over 6 products, then k=3
    assert kept[1]["feedback"] == [{"kind": "click", "product_id": first, "at": kept[1]["feedback"][0]["at"]}]


def test_one_result_per_model_collapses_a_feeds_variants(monkeypatch, tmp_path, sneaker_folder):
    """A catalog with `item_group_id` (a feed's variants of one model) offers "One result per model"."""
    lines = ["product_id,image,item_group_id"]
    for i, product in enumerate(sorted(sneaker_folder.iterdir())[:6]):
        lines += [f"{product.name},{img},model-{i // 3}" for img in sorted(product.glob("*.jpg"))[:2]]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with Catalog.open(tmp_path / "cat", create=True) as cat:
        cat.index(tmp_path / "m.csv")
    at = start(monkeypatch, tmp_path / "cat")
    at.checkbox(key="anyway").check().run()  # every product, whatever its score
    at.button(key="example_0").click().run()
    assert len(cards(at)) == 6
    at.checkbox(key="collapse").check().run()
    shown = [p for _, p in cards(at)]
    models = {p: f"model-{i // 3}" for i, p in enumerate(sorted(d.name for d in sneaker_folder.iterdir())[:6])}
    assert len(shown) == 2 and {models[p] for p in shown} == {"model-0", "model-1"}
