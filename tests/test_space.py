"""The Space: forms come from the methods' declarations and refuse bad values with the valid choices; in headless
Chromium against the real app on localhost, a user compresses a model, sees progress and the table, pushes with
their token to a loopback Hub, and the pushed repo loads; bad options, missing repos and cancel leave it usable."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import hfcompress
from hfcompress.errors import InvalidOptionError
from hfcompress.recipe import Recipe
from hfcompress.registry import available_methods
from hfcompress.space import check_fits, default_target, error_text, method_form, step_from_form, steps_yaml
from tests import oidc_server
from tests.tiny_models import ROOT_DIR, fingerprint, reloaded_outputs, same_outputs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT_DIR / "tests" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_every_option_of_every_method_has_an_input_of_its_kind():
    for name, spec in available_methods().items():
        form = method_form(name)
        assert [f.name for f in form] == [f for f in spec.config_class.__dataclass_fields__ if f != "method"]
        for field in form:
            assert field.kind in ("dropdown", "checkbox", "integer", "number", "text"), (name, field)
            assert field.help, (name, field.name)
    kinds = {f.name: f.kind for f in method_form("wanda")}
    assert kinds["pattern"] == "text" and kinds["sequential"] == "checkbox" and kinds["sparsity"] == "text"
    assert {f.name: f for f in method_form("layer_drop")}["drop"].choices == ("attention", "mlp", "block", "joint")


def test_form_values_become_checked_steps():
    assert step_from_form("wanda", {"sparsity": "0.5", "pattern": "unstructured", "targets": ""}) == {
        "method": "wanda", "sparsity": 0.5}
    assert step_from_form("layerwise_quant", {"bits": "8,4,2", "avg_bits": "6"}) == {
        "method": "layerwise_quant", "bits": [8, 4, 2], "avg_bits": 6.0}
    assert step_from_form("layer_drop", {"n": 2.0})["n"] == 2
    with pytest.raises(InvalidOptionError, match=r"sparsity must be in \[0, 1\)"):
        step_from_form("wanda", {"sparsity": "1.5"})
    with pytest.raises(InvalidOptionError, match="valid: `attention`"):
        step_from_form("layer_drop", {"drop": "heads"})
    steps = [step_from_form("wanda", {"sparsity": "0.5"}), step_from_form("rtn", {"bits": "4"})]
    recipe = Recipe.from_yaml(steps_yaml("builtin:smollm2-135m", steps, {"n_samples": 8, "seq_len": 64}))
    assert [type(step).method for step in recipe.steps] == ["wanda", "rtn"] and recipe.calibration.n_samples == 8
    assert default_target("alice", "HuggingFaceTB/SmolLM2-135M", steps) == "alice/SmolLM2-135M-wanda-rtn"
    assert default_target(None, "builtin:smollm2-135m", steps[:1]) == "me/smollm2-135m-wanda"


def test_errors_tell_a_browser_user_what_to_do_about_tokens():
    import httpx
    from huggingface_hub import errors as hub_errors

    from hfcompress.errors import ModelLoadError, PushError
    from hfcompress.hub import check_token
    from hfcompress.loading import _hub_error

    with pytest.raises(PushError) as pushing:
        check_token()
    response = httpx.Response(404, request=httpx.Request("GET", "http://hub"))
    hub_side = [_hub_error("alice/x", kind("nope", response=response))
                for kind in (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError)]
    for error in (pushing.value, *hub_side):
        text = error_text(error)
        assert "hf auth login" not in text and "HF_TOKEN" not in text and "sign in" in text, text
    assert error_text(ModelLoadError("plain")) == "plain" and error_text(KeyError("x")) == "KeyError: 'x'"


def test_a_model_too_large_for_the_machine_is_refused_from_its_config(tiny):
    needed = check_fits(tiny("llama"))
    with pytest.raises(InvalidOptionError, match="GiB of memory and this machine has"):
        check_fits(tiny("llama"), available=needed - 1)


# --- the browser ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(hub, tmp_path, host: str, extra_env: dict | None = None):
    """`python spaces/app.py` on a free port of `host`, its Hub calls going to the loopback Hub; yields its URL."""
    if not os.path.exists(CHROMIUM) or not _has_playwright():
        pytest.skip("headless Chromium tests need Debian's chromium and the playwright package")
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "app_home"),
           "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1", **(extra_env or {})}
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, "spaces/app.py"], cwd=ROOT_DIR, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "app.log").read_text()
            time.sleep(0.5)
    try:
        yield f"http://{host}:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def app(hub, tmp_path):
    """The app as run locally: each session types its token."""
    for url in _start_app(hub, tmp_path, "127.0.0.1"):
        yield url, tmp_path


@pytest.fixture
def space_app(hub, tmp_path):
    """The app as on a Space with `hf_oauth: true`: Gradio's real OAuth routes, against the loopback provider
    (served on `localhost`, where browsers keep the Secure session cookie over plain http)."""
    server, provider = oidc_server.start()
    env = {"SYSTEM": "spaces", "SPACE_ID": "tests/hfcompress", "OAUTH_CLIENT_ID": oidc_server.CLIENT_ID,
           "OAUTH_CLIENT_SECRET": oidc_server.CLIENT_SECRET, "OPENID_PROVIDER_URL": provider.issuer,
           "OAUTH_SCOPES": "openid profile read-repos write-repos manage-repos"}
    for url in _start_app(hub, tmp_path, "localhost", env):
        yield url, provider
    server.shutdown()


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # headless, each context with a fresh profile of playwright's own (it refuses --user-data-dir here)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS[1:])
        yield browser
        browser.close()


def _open(browser, url: str, cookies: list | None = None):
    context = browser.new_context(viewport={"width": 1280, "height": 1800})
    if cookies:
        context.add_cookies(cookies)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("button", name="Run").wait_for()
    return page


@pytest.fixture
def page(app, browser):
    return _open(browser, app[0])


def _fill(page, elem_id: str, value: str) -> None:
    """Type into the input of the component with this elem_id, as a user would (Enter picks a dropdown value)."""
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(value)
    box.press("Enter" if box.get_attribute("role") == "combobox" else "Tab")


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _configure(page, model: str) -> None:
    _fill(page, "model", model)
    page.locator("#calibration").get_by_text("calibration").click()
    _fill(page, "n-samples", "4")
    _fill(page, "seq-len", "32")


def test_compress_then_push_from_the_browser(page, hub, tiny, app, tmp_path):
    _configure(page, tiny("llama"))
    _fill(page, "wanda-sparsity", "0.5")
    _shot(page, "1-configured")
    page.get_by_role("button", name="Run").click()
    page.locator("#status .progress-text").first.wait_for()       # the progress bar, per step and block
    _shot(page, "2-running")
    page.locator("#status").get_by_text("Compressed and saved").wait_for()
    _shot(page, "3-done")
    table = page.locator("#table").inner_text()
    assert "perplexity" in table and "sparsity" in table
    _fill(page, "token", "hf_test_alice")
    _fill(page, "target", "alice/tiny-wanda")
    page.get_by_role("button", name="Push to the Hub").click()
    page.locator("#pushed").get_by_text("Pushed to").wait_for()
    _shot(page, "4-pushed")
    hub.repos["alice/tiny-wanda"]["private"] = False                    # searchable once public
    _fill(page, "query", "tiny-wan")
    page.get_by_role("button", name="Search").click()
    page.locator("#status").get_by_text("1 model found on the Hub.").wait_for()
    page.locator("#model").locator("input").first.click()
    page.get_by_role("option", name="alice/tiny-wanda").wait_for()     # the picker offers what the Hub found
    assert "alice/tiny-wanda" in hub.repos and "model.safetensors" in hub.repos["alice/tiny-wanda"]["files"]
    assert yaml.safe_load(hub.repos["alice/tiny-wanda"]["files"]["README.md"].decode().split("---")[1])

    (folder,) = Path(app[1]).glob("hfcompress-space/*/*/out")       # the session's result, as the app wrote it
    expected = fingerprint(hfcompress.load(str(folder), dtype=torch.float32))
    fresh = {"PATH": "", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test_alice", "HF_HUB_DISABLE_XET": "1",
             "HF_HOME": str(tmp_path / "fresh_home")}
    for loader, logits in reloaded_outputs("alice/tiny-wanda", tmp_path, env=fresh).items():
        assert isinstance(logits, torch.Tensor) and same_outputs(logits, expected), loader


def test_bad_option_missing_repo_and_cancel_leave_the_app_usable(page, app, tiny, tmp_path):
    _configure(page, tiny("llama"))
    _fill(page, "wanda-sparsity", "1.5")
    page.get_by_role("button", name="Run").click()
    page.locator("#status").get_by_text("sparsity must be in [0, 1)").wait_for()
    _shot(page, "5-bad-option")
    _fill(page, "wanda-sparsity", "0.5")
    _fill(page, "model", "nobody/no-such-model")
    page.get_by_role("button", name="Run").click()
    page.locator("#status").get_by_text("nobody/no-such-model").wait_for()
    assert "Error" in page.locator("#status").inner_text()
    _shot(page, "6-missing-repo")

    _fill(page, "model", _slow_model(tmp_path / "slow"))
    _fill(page, "n-samples", "128")
    _fill(page, "seq-len", "256")
    page.get_by_role("button", name="Run").click()
    time.sleep(3)
    page.get_by_role("button", name="Cancel").click()
    page.locator("#status").get_by_text("Cancelled").wait_for()
    _shot(page, "7-cancelled")
    work = Path(app[1]) / "hfcompress-space"
    assert not work.exists() or not any(work.rglob("hfcompress.json"))
    _fill(page, "model", tiny("llama"))                  # still usable: a two-step recipe built in the form
    _fill(page, "n-samples", "4")
    _fill(page, "seq-len", "32")
    from playwright.sync_api import expect

    def click_and_see(button: str, steps: int) -> None:  # a click while an event runs is dropped: wait for each
        page.get_by_role("button", name=button).click()
        expect(page.locator("#recipe").get_by_text("method: ")).to_have_count(steps)

    click_and_see("Add step to the recipe", 1)
    _fill(page, "method", "rtn")
    _fill(page, "rtn-bits", "8")
    click_and_see("Add step to the recipe", 2)
    click_and_see("Add step to the recipe", 3)
    click_and_see("Remove last step", 2)
    expect(page.locator("#recipe").get_by_text("method: rtn")).to_have_count(1)   # added twice, removed once
    recipe = yaml.safe_load("\n".join(page.locator("#recipe .cm-line").all_inner_texts()))
    assert [step["method"] for step in recipe["steps"]] == ["wanda", "rtn"] and recipe["steps"][1]["bits"] == [8]
    page.get_by_role("button", name="Run").click()
    page.locator("#status").get_by_text("Compressed and saved").wait_for()
    _shot(page, "8-two-steps")
    table = page.locator("#table").inner_text()
    assert "sparsity" in table and "nominal bits" in table


def _slow_model(folder: Path) -> str:
    """A random 32-block Llama: long enough a run (about ten seconds here) to be cancelled halfway."""
    import transformers

    from tests.tiny_models import COMMON, tokenizer

    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 512,
                                         "num_hidden_layers": 32})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return str(folder)


def test_two_signed_in_users_keep_their_own_tokens_and_results(space_app, browser, hub, tiny, tmp_path):
    """Through Gradio's real OAuth routes: each user signs in, runs and pushes with their own token; the second
    run waits in the queue, with its position shown, while the first one runs."""
    url, provider = space_app
    pages = {}
    for user in ("alice", "bob"):
        page = _open(browser, url, [{"name": "user", "value": user, "url": provider.issuer}])
        assert not page.locator("#token").is_visible()           # on a Space: no token field, the sign-in button
        page.get_by_role("button", name="Sign in with Hugging Face").click()
        page.get_by_role("button", name=f"Logout ({user})").wait_for()
        page.get_by_role("button", name="Run").wait_for()
        pages[user] = page
    assert provider.logins == ["alice", "bob"]
    _configure(pages["alice"], _slow_model(tmp_path / "slow"))
    _fill(pages["alice"], "n-samples", "64")
    _fill(pages["alice"], "seq-len", "128")
    _configure(pages["bob"], tiny("llama"))
    pages["alice"].get_by_role("button", name="Run").click()
    pages["alice"].locator("#status .progress-text").first.wait_for()
    pages["bob"].get_by_role("button", name="Run").click()
    pages["bob"].locator("#status").get_by_text("queue").first.wait_for()   # e.g. "queue: 1/1"
    _shot(pages["bob"], "9-second-user-queued")
    for user, page in pages.items():
        page.locator("#status").get_by_text("Compressed and saved").wait_for(timeout=300_000)
        target = page.locator("#target").locator("input, textarea").first.input_value()
        assert target.startswith(f"{user}/"), target                       # default: {user}/{model}-{method}
        page.get_by_role("button", name="Push to the Hub").click()
        page.locator("#pushed").get_by_text("Pushed to").wait_for()
        assert hub.committed_with[target] == f"hf_oauth_{user}"          # pushed with that user's own token
    _shot(pages["alice"], "10-first-user-pushed")
    layers = sorted(json.loads(repo["files"]["config.json"])["num_hidden_layers"] for repo in hub.repos.values())
    assert layers == [3, 32]                                                # each pushed their own result
