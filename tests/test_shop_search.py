"""What shops ask of search (issue 38 items 2, 4, 5): a region of a photo (a product pasted into a larger scene
is found by its crop, not by the whole scene), many queries at once (POST /search/batch and engine.query --jsonl
answer as the single searches do, each bad query with its own error), and search within the predicted class
(exactly the label filter of the class the network predicts)."""
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine.query import main as query_main
from engine.record import item_id
from engine.search import Searcher
from engine.synthetic import draw
from shards.filters import Filter
from tests.browser import served_page
from training.images import CropBox, load_image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.api.app import create_app  # noqa: E402
from engine.api.service import Service  # noqa: E402

PRODUCT_AT = (72, 24)  # where the product is pasted into the 128x128 scene
PRODUCT_BOX = "72,24,32,32"


@pytest.fixture(scope="module")
def scene(image_folder, tmp_path_factory):
    """(scene file, product file): a catalog photo pasted into a larger scene of another class (stripes)."""
    product = sorted((image_folder / "circle").glob("*.png"))[3]
    scene = draw("hstripes", 128, np.random.default_rng(5))
    scene.paste(Image.open(product), PRODUCT_AT)
    file = tmp_path_factory.mktemp("scene") / "room.png"
    scene.save(file)
    return file, product


@pytest.fixture(scope="module")
def client(shop):
    with TestClient(create_app(Service(shop, read_only=True))) as client:
        yield client


def photo(path) -> tuple[str, bytes, str]:
    return path.name, path.read_bytes(), "image/png"


def same_results(got: list[dict], expected: list[dict]) -> bool:
    """The same items in the same order with the same codes' distances; features of a photo encoded in a batch
    may differ from its encoding alone in the last float bits (the backbone's kernels depend on batch size)."""
    return ([(r["id"], r["hamming"]) for r in got] == [(r["id"], r["hamming"]) for r in expected]
            and np.allclose([r["distance"] for r in got], [r["distance"] for r in expected], rtol=1e-4,
                            atol=1e-3))


def test_a_product_in_a_scene_is_found_by_its_crop_not_by_the_whole_scene(shop, scene, client):
    room, product = scene
    wanted = item_id(product.resolve())
    with Searcher(shop) as searcher:
        by_crop = searcher.search([room], k=10, crop=CropBox.parse(PRODUCT_BOX))[0]
        whole = searcher.search([room], k=10)[0]
    assert by_crop[0].id == wanted and by_crop[0].hamming == 0  # the very pixels it was indexed from
    assert wanted not in [r.id for r in whole]
    answer = client.post(f"/search?k=10&crop={PRODUCT_BOX}", files={"image": photo(room)})
    assert answer.status_code == 200, answer.text
    assert [r["id"] for r in answer.json()["results"]] == [r.id for r in by_crop]
    answer = client.post("/search?k=10", files={"image": photo(room)})
    assert [r["id"] for r in answer.json()["results"]] == [r.id for r in whole]


@pytest.mark.parametrize("crop, says", [("1,2,3", "four integers"), ("0,0,0,5", "w and h >= 1"),
                                        ("-1,0,5,5", "x and y must be >= 0"), ("100,100,29,28", "reaches outside")])
def test_a_bad_crop_is_a_422_in_one_line(scene, client, crop, says):
    answer = client.post(f"/search?crop={crop}", files={"image": photo(scene[0])})
    assert answer.status_code == 422 and says in answer.json()["error"], answer.text


def run_query(capsys, *argv: str) -> tuple[int, str, str]:
    """engine.query in this process (the model loads once for the session): (exit status, stdout, stderr)."""
    status = query_main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_the_query_command_crops_and_words_a_bad_box_as_one_line(shop, scene, capsys):
    room, product = scene
    command = ["--catalog", str(shop), "--json", "-k", "3", str(room)]
    status, out, err = run_query(capsys, *command, "--crop", PRODUCT_BOX)
    assert status == 0, err
    assert json.loads(out)[0]["results"][0]["id"] == item_id(product.resolve())
    status, out, err = run_query(capsys, *command, "--crop", "0,0,129,10")
    assert status == 2 and err.count("\n") == 1 and "outside the 128x128" in err
    with pytest.raises(SystemExit) as exit:
        run_query(capsys, *command, "--crop", "0,0,9")
    assert exit.value.code == 2 and "four integers" in capsys.readouterr().err


def test_a_batch_answers_as_single_searches_do_with_the_photos_encoded_once(shop, scene, image_folder, client,
                                                                              monkeypatch):
    room, product = scene
    other = sorted((image_folder / "checker").glob("*.png"))[0]
    some_id = item_id(sorted((image_folder / "ring").glob("*.png"))[0].resolve())
    queries = [{"image": 0, "k": 4}, {"image": "room.png", "k": 3, "crop": PRODUCT_BOX},
               {"id": some_id, "k": 5, "label": ["ring", "dots"]}, {"image": 1, "k": 2, "where": ["brand:acme"]}]
    singles = [client.post("/search?k=4", files={"image": photo(room)}),
               client.post(f"/search?k=3&crop={PRODUCT_BOX}", files={"image": photo(room)}),
               client.get(f"/search?id={some_id}&k=5&label=ring&label=dots"),
               client.post("/search?k=2&where=brand:acme", files={"image": photo(other)})]
    encoder = client.app.state.service.searcher.encoder
    batches = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda images: batches.append(len(images)) or encode(images))
    uploads = [("images", photo(room)), ("images", photo(other))]
    answer = client.post("/search/batch", data={"queries": json.dumps(queries)}, files=uploads)
    assert answer.status_code == 200, answer.text
    answers = answer.json()["answers"]
    assert all(same_results(a["results"], s.json()["results"]) for a, s in zip(answers, singles, strict=True))
    assert [a["query"] for a in answers] == ["room.png", "room.png", f"id:{some_id}", other.name]
    assert all(a["error"] is None for a in answers) and batches == [3]  # the photos as one batch
    monkeypatch.setattr("engine.batch.ENCODE_BATCH", 2)  # more photos than one model call takes
    batches.clear()
    chunked = client.post("/search/batch", data={"queries": json.dumps(queries)}, files=uploads).json()["answers"]
    assert batches == [2, 1] and all(same_results(a["results"], b["results"]) for a, b in zip(chunked, answers))
    bad = queries + [{"image": 2}, {"id": 12345}, {"image": 0, "crop": "0,0,200,200"}]
    answer = client.post("/search/batch", data={"queries": json.dumps(bad)},
                         files=uploads + [("images", ("bad.png", b"not an image", "image/png"))])
    answers = answer.json()["answers"]
    assert all(same_results(a["results"], s.json()["results"]) for a, s in zip(answers, singles))  # the others
    assert "not a usable image" in answers[4]["error"] and answers[4]["results"] is None
    assert answers[5]["error"] == "no item 12345 in the catalog"
    assert "reaches outside" in answers[6]["error"]


@pytest.mark.parametrize("queries, says", [
    ("not json", "queries: Invalid JSON"), ("[]", "at least 1 item"), (json.dumps([{"id": 1}] * 257), "at most 256"),
    ('[{"image": 0, "id": 3}]', "exactly one of image and id"), ('[{"image": 5}]', "names none of the 1 uploaded"),
    ('[{"image": "other.png"}]', "names none"), ('[{"image": 0, "lable": ["a"]}]', "lable: Extra inputs"),
    ('[{"id": 3, "crop": "0,0,4,4"}]', "crop applies to an image"), ('[{"image": 0, "k": 0}]', "0 k: Input should"),
    ('[{"image": 0, "within": "guessed"}]', "within: Input should be 'predicted'"),
], ids=["not-json", "none", "too-many", "image-and-id", "no-such-position", "no-such-name", "misspelt", "crop-id",
        "bad-k", "bad-within"])
def test_a_malformed_batch_is_one_422(scene, client, queries, says):
    answer = client.post("/search/batch", data={"queries": queries}, files=[("images", photo(scene[0]))])
    assert answer.status_code == 422 and says in answer.json()["error"], answer.text
    assert set(answer.json()) == {"error"}


def test_the_class_scores_are_the_networks_logits(shop, image_folder):
    files = sorted(image_folder.rglob("*.png"))[::20]
    with Searcher(shop) as searcher:
        model = searcher.encoder.model
        images = torch.stack([load_image(f, model.config.input_size) for f in files])
        _, features = searcher.encoder.encode(images)
        with torch.inference_mode():
            logits = model(images).float().numpy()
        np.testing.assert_allclose(searcher.encoder.class_scores(features), logits, rtol=1e-4, atol=1e-4)


def test_within_the_predicted_class_is_the_label_filter_of_that_class(shop, image_folder, client, capsys):
    files = sorted(image_folder.rglob("*.png"))[5::24]  # one of each class
    ids = [item_id(f.resolve()) for f in files]
    with Searcher(shop) as searcher:
        scores = searcher.encoder.class_scores(searcher.stored(ids)[1])
        names = searcher.encoder.class_names
        top = [[names[c] for c in np.argsort(-row, kind="stable")[:2]] for row in scores]
        within = searcher.search_ids(ids, k=8, within_predicted=1)
        within_two = searcher.search_ids(ids, k=8, within_predicted=2, filter=Filter.parse(where=["brand:acme"]))
        for query, likely, found, found_two in zip(ids, top, within, within_two):
            assert found == searcher.search_ids([query], k=8, filter=Filter.parse([likely[0]]))[0]
            assert found_two == searcher.search_ids([query], k=8, filter=Filter.parse(likely, ["brand:acme"]))[0]
            assert {r.label for r in found} == {likely[0]}
        excluded = [name for name in names if name != top[0][0]][:2]
        assert searcher.search_ids(ids[:1], within_predicted=1, filter=Filter.parse(excluded)) == [[]]
    status, out, err = run_query(capsys, "--catalog", str(shop), "--json", "-k", "8", "--id", str(ids[1]),
                                 "--within-predicted")
    assert status == 0 and [r["id"] for r in json.loads(out)[0]["results"]] == [r.id for r in within[1]], err
    answer = client.get(f"/search?id={ids[0]}&k=8&within=predicted")
    assert [r["id"] for r in answer.json()["results"]] == [r.id for r in within[0]]
    answer = client.get(f"/search?id={ids[0]}&k=8&within=predicted&within_top=2&where=brand:acme")
    assert [r["id"] for r in answer.json()["results"]] == [r.id for r in within_two[0]]


def test_query_jsonl_answers_a_line_per_query_in_order(shop, scene, image_folder, capsys, tmp_path,
                                                        monkeypatch):
    room, product = scene
    some_id = item_id(sorted((image_folder / "ring").glob("*.png"))[0].resolve())
    lines = [{"image": str(room), "k": 3}, {"image": str(room), "k": 2, "crop": PRODUCT_BOX}, "not json",
             {"id": some_id, "k": 4, "within": "predicted"}, {"image": str(tmp_path / "gone.png")},
             {"image": str(room), "crop": "0,0,500,5"}, {"id": some_id, "k": 0}, {"id": some_id, "label": "ring"}]
    file = tmp_path / "queries.jsonl"
    file.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    status, out, err = run_query(capsys, "--catalog", str(shop), "--jsonl", str(file), "--where", "brand:other")
    assert status == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["line"] for a in answers] == list(range(1, len(lines) + 1))
    with Searcher(shop) as searcher:
        other = Filter.parse(where=["brand:other"])
        expected = [searcher.search([room], k=3, filter=other)[0],
                    searcher.search([room], k=2, filter=other, crop=CropBox.parse(PRODUCT_BOX))[0], None,
                    searcher.search_ids([some_id], k=4, filter=other, within_predicted=1)[0]]
    for answer, results in zip(answers, expected):
        if results is not None:
            assert [r["id"] for r in answer["results"]] == [r.id for r in results]
    assert "not JSON" in answers[2]["error"] and answers[2]["query"] is None
    assert "not found" in answers[4]["error"] and "reaches outside" in answers[5]["error"]
    assert "k: Input should be greater than or equal to 1" in answers[6]["error"]
    assert {r["label"] for r in answers[7]["results"]} == {"ring"}
    assert all("metadata" in r and r["metadata"]["brand"] == "other" for a in answers if "results" in a
               for r in a["results"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"id": some_id, "k": 4, "within": "predicted"})))
    status, out, err = run_query(capsys, "--catalog", str(shop), "--jsonl", "-", "--where", "brand:other")
    assert status == 0 and json.loads(out)["results"] == answers[3]["results"], err


def test_a_box_dragged_on_the_page_searches_that_region(shop, scene, cli_env):
    """In a real browser (as tests/test_browser.py): the box drawn on the scaled photo is sent in the photo's own
    pixels, and the product in the scene comes first."""
    room, product = scene
    with served_page(shop, cli_env, viewport={"width": 1100, "height": 900}) as (base, page, errors):
        page.goto(base + "/")
        page.set_input_files("#file", str(room))
        page.wait_for_selector("#grid .result")
        page.wait_for_function("document.querySelector('#query .cropper img').style.width !== ''")
        shown = page.eval_on_selector("#query .cropper img", "i => i.getBoundingClientRect().toJSON()")
        scale = shown["width"] / 128
        x, y, width, height = (int(v) for v in PRODUCT_BOX.split(","))
        with page.expect_response(lambda r: "crop=" in r.url) as searched:
            page.mouse.move(shown["x"] + x * scale, shown["y"] + y * scale)
            page.mouse.down()
            page.mouse.move(shown["x"] + (x + width) * scale, shown["y"] + (y + height) * scale, steps=4)
            page.mouse.up()
        assert f"crop={PRODUCT_BOX.replace(',', '%2C')}" in searched.value.url
        first = str(item_id(product.resolve()))
        page.wait_for_function(f"document.querySelector('#grid .result').dataset.id === '{first}'")
        assert not errors, errors
