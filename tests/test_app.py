"""app.py, the web page: `app.py --demo` served on a free loopback port, driven by a real headless Chromium
(Debian's /usr/bin/chromium through playwright) and by gradio_client.

Every generation asks for max_seconds 1, which makes its length certain whatever the random demo weights
do: the loop stops at the cap, ceil(1 s * 25 / 4) = 7 patches, before the stop head may first be read (patch
7); t2av and tts outputs start with the 0.5 s prefix (12 frames), so they hold 12 + 7 * 4 = 40 frames (1.6 s).

Needs requirements-app.txt and Debian's chromium (.ci/run installs both); without them the tests are skipped,
and fail under TALKER_CI=1 (as .ci/run sets it).
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import soundfile as sf

import infer
from media import video_io
from runtime.inputs import DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO, load_reference_audio

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots (git-ignored)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_FRAMES = 12 + 7 * 4  # see the module docstring
FRAME_S = 1 / 25
HANG_GUARD_S = 180  # a deadline against hangs, never a speed requirement


def _require(ok: bool, what: str) -> None:
    if ok:
        return
    message = f"{what} is needed for the web page tests (.ci/run installs it)"
    if os.environ.get("TALKER_CI") == "1":  # CI never passes by skipping
        pytest.fail(message)
    pytest.skip(message)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def app():
    _require(_importable("gradio") and _importable("gradio_client"), "pip install -r requirements-app.txt")
    import app

    return app


# ---------------------------------------------------------------------------------------------- the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`app.py --demo` in a subprocess, its temporary folder (TMPDIR) and output inside `folder`."""

    def __init__(self, folder: Path):
        self.tmp = folder / "tmp"
        self.tmp.mkdir()
        self.url = f"http://127.0.0.1:{_free_port()}/"
        self.log_path = folder / "server.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(self.tmp), HF_HUB_OFFLINE="1",
                   GRADIO_HEARTBEAT_INTERVAL="1", NO_PROXY="127.0.0.1,localhost")
        cmd = [sys.executable, str(REPO / "app.py"), "--demo", "--port", self.url.rsplit(":", 1)[1].strip("/"),
               "--queue-size", "1", "--max-upload-mb", "1"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if opener.open(self.url, timeout=5).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"app.py did not answer within {HANG_GUARD_S} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(app, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("app"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(app, tmp_path_factory):
    _require(_importable("playwright") and Path(CHROMIUM).is_file(),
             "playwright (requirements-app.txt) and Debian's chromium (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS)
        context.set_default_timeout(HANG_GUARD_S * 1000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


# ---------------------------------------------------------------------------------------------- the page

FETCH_BASE64 = """async (source) => {
  const bytes = new Uint8Array(await (await fetch(source)).arrayBuffer());
  let text = '';
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}"""
RECORD_STATUS = """() => {
  window.statusSeen = [];
  new MutationObserver(() => document.querySelectorAll('[data-testid=status-tracker]').forEach(e => {
    const text = e.innerText.trim();
    if (text && !window.statusSeen.includes(text)) window.statusSeen.push(text);
  })).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


class Tab:
    """One tab of a fresh page (a new session), with every request the page makes off the loopback noted."""

    def __init__(self, app, context, server, mode: str):
        self.mode, self.server = mode, server
        self.page = context.new_page()
        self.outside = []
        self.page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
                     else self.outside.append(r.url))
        self.page.goto(server.url)
        self.page.get_by_role("tab", name=app.TABS[mode][0]).click()
        self.page.wait_for_selector(f"#generate-{mode}", state="visible")
        self.page.evaluate(RECORD_STATUS)

    def fill_text(self, text: str) -> None:
        self.page.fill(f"#text-{self.mode} textarea", text)

    def set_option(self, name: str, value) -> None:
        field = self.page.locator(f"#{name}-{self.mode} input")
        if not field.is_visible():
            self.page.click(f"#options-{self.mode} button.label-wrap")
        field.fill(str(value))

    def upload(self, name: str, path) -> None:
        clear = self.page.locator(f"#{name}-{self.mode} button[aria-label=Clear]")
        if clear.count():
            clear.first.click()
        self.page.set_input_files(f"#{name}-{self.mode} input[type=file]", str(path))

    def generate(self) -> None:
        self.page.click(f"#generate-{self.mode}")

    def result(self, path: Path) -> Path:
        """What the result player plays (its source fetched by the page), once the page has it, saved at path."""
        player = f"#result-{self.mode} {'audio' if self.mode == 'tts' else 'video'}[src]"
        source = self.page.wait_for_selector(player, state="attached").get_attribute("src")
        path.write_bytes(base64.b64decode(self.page.evaluate(FETCH_BASE64, source)))
        return path

    def downloads(self) -> list:
        """The files the downloads list links to, as their paths on the server."""
        links = self.page.locator(f"#downloads-{self.mode} a[download]")
        return [Path(unquote(href.split("/file=", 1)[1])) for href in links.evaluate_all("a => a.map(e => e.href)")]

    def toast(self, needle: str) -> str:
        return self.page.wait_for_selector(f".toast-body:has-text({needle!r})").inner_text()

    def report(self) -> str:
        return self.page.input_value(f"#report-{self.mode} textarea")

    def status_seen(self) -> list:
        return self.page.evaluate("window.statusSeen")



def _assert_mp4(path: Path, n_frames=N_FRAMES) -> Path:
    info = video_io.probe(path)
    assert (info["video_codec"], info["pix_fmt"], info["audio_codec"]) == ("h264", "yuv420p", "aac")
    assert info["faststart"] is True and info["fps"] == 25
    assert info["n_frames"] == n_frames and abs(info["video_duration"] - n_frames * FRAME_S) < 1e-6
    assert abs(info["audio_duration"] - info["video_duration"]) <= FRAME_S
    return path


def _still_face(path: Path) -> Path:
    """The sample face's first frame as a PNG (written by ffmpeg)."""
    subprocess.run([video_io.ffmpeg_exe(), "-v", "error", "-y", "-i", str(DEFAULT_REF_VIDEO), "-frames:v", "1",
                    str(path)], check=True)
    return path


# ---------------------------------------------------------------------------------------------- tests

def test_t2av_in_the_browser(app, server, browser, tmp_path):
    tab = Tab(app, browser, server, "t2av")
    tab.fill_text("Hello from the web page.")
    tab.set_option("max_seconds", 1)
    tab.generate()
    _assert_mp4(tab.result(tmp_path / "t2av.mp4"))
    report = tab.report().splitlines()
    assert report[0].startswith(f"[talker] t2av: 1.60 s audio, {N_FRAMES} frames (1.60 s video); 7 patches "
                                "(length_cap)")
    assert any("hit the length cap" in line for line in report[1:])
    assert report[-1] == f"warning: {app.DEMO_NOTICE}"
    assert tab.page.locator("#demo-banner").inner_text().startswith("DEMO: tiny RANDOMLY INITIALISED")
    assert [p.suffix for p in tab.downloads()] == [".wav"]
    seen = tab.status_seen()  # the progress bar, fed by the pipeline's callback
    assert any("7/7 patches" in s and "t2av patches" in s for s in seen), seen
    assert any(f"{N_FRAMES}/{N_FRAMES} frames" in s and "render" in s for s in seen), seen
    assert tab.outside == []  # no CDN, no fonts, no analytics: the page works offline
    ARTIFACTS.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / "app_t2av.png"), full_page=True)
    tab.page.close()


def test_tts_in_the_browser_and_the_session_files_go_when_the_page_closes(app, server, browser, tmp_path):
    tab = Tab(app, browser, server, "tts")
    tab.fill_text("Only speech this time.")
    tab.set_option("max_seconds", 1)
    tab.generate()
    wav = tab.result(tmp_path / "tts.wav")
    data, sr = sf.read(wav)
    assert sr == 24000 and len(data) == N_FRAMES * 960
    assert video_io.probe(wav)["audio_duration"] == pytest.approx(N_FRAMES * FRAME_S)
    assert tab.report().startswith("[talker] tts: 1.60 s audio; 7 patches (length_cap)")

    served, = tab.downloads()
    assert served.is_file() and served.is_relative_to(server.tmp)
    tab.page.close()  # the session ends: its folder goes
    deadline = time.monotonic() + HANG_GUARD_S
    while served.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not served.parent.exists()


def test_bad_upload_shows_the_cli_error_and_the_next_request_works(app, server, browser, tmp_path):
    tab = Tab(app, browser, server, "tts")
    tab.set_option("max_seconds", 1)
    (tmp_path / "voice.txt").write_text("not a voice\n")
    tab.upload("ref_audio", tmp_path / "voice.txt")  # the page itself refuses a file that is not audio
    assert "Invalid file type: voice.txt" in tab.toast("voice.txt")

    fake = tmp_path / "voice.wav"
    fake.write_text("a text file named like audio\n")
    with pytest.raises(ValueError) as err:
        load_reference_audio(fake)
    expected = infer.message_of(err.value).replace(str(fake), fake.name)  # what infer.py prints after "error: "
    tab.upload("ref_audio", fake)
    tab.generate()
    assert expected in tab.toast(expected)
    assert f"app.py: error: {expected}" in server.log()

    tab.upload("ref_audio", DEFAULT_REF_AUDIO)
    tab.generate()
    assert sf.info(tab.result(tmp_path / "ok.wav")).frames == N_FRAMES * 960


def test_still_image_face_in_the_browser(app, server, browser, tmp_path):
    tab = Tab(app, browser, server, "t2av")
    tab.set_option("max_seconds", 1)
    tab.upload("ref_image", _still_face(tmp_path / "face.png"))
    tab.page.wait_for_selector("#ref_image-t2av img")
    tab.generate()
    mp4 = _assert_mp4(tab.result(tmp_path / "still.mp4"))
    frames, _ = video_io.read_frames(mp4, max_frames=12)
    assert abs(frames.astype(int) - frames[:1].astype(int)).max() <= 8  # the prefix: the face held still


def test_api_generates_an_mp4_and_keeps_the_cli_limits(client, tmp_path):
    from gradio_client import handle_file

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert sorted(api) == ["/a2v", "/t2av", "/tts", "/v2a"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in api["/t2av"]["parameters"]}
    assert (defaults["cfm_steps"], defaults["cfm_temperature"], defaults["seed"], defaults["max_seconds"]) == \
           (10, 0.3, 0, None)  # GenerationRequest's defaults

    video, downloads, report = client.predict(text="Through the API.", max_seconds=1, save_latents=True,
                                              api_name="/t2av")
    _assert_mp4(video)
    assert sorted(Path(p).suffix for p in downloads) == [".safetensors", ".wav"]
    assert report.startswith("[talker] t2av: 1.60 s audio")

    from gradio_client.exceptions import AppError

    short_voice = tmp_path / "short.wav"  # (a voice over 30 s is no longer refused: its first 30 s are used)
    sf.write(short_voice, [0.1, -0.1] * 200, 8000)  # 50 ms
    with pytest.raises(AppError, match=r"^short\.wav: reference audio is 50 ms long; at least 100 ms is needed"):
        client.predict(text="Too short a voice.", ref_audio=handle_file(short_voice), api_name="/tts")
    big = tmp_path / "big.wav"
    sf.write(big, [0.1, -0.1] * 12000 * 25, 24000)  # 25 s, 1.2 MB: over this server's --max-upload-mb 1
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict(text="Too big a file.", ref_audio=handle_file(big), api_name="/tts")


@pytest.mark.parametrize("mode,n_frames", [("a2v", 121), ("v2a", 100)])  # the sample voice's / face video's length
def test_api_a2v_and_v2a_take_the_input_length(client, mode, n_frames):
    video, downloads, report = client.predict(api_name=f"/{mode}")  # every input as the page presets it
    _assert_mp4(Path(video), n_frames)
    assert report.startswith(f"[talker] {mode}: ") and "(given_length)" in report


def test_one_generation_at_a_time_behind_a_bounded_queue(app, server, browser, client, tmp_path):
    tab = Tab(app, browser, server, "tts")
    tab.set_option("max_seconds", 1)
    running = client.submit(text="A slow request.", cfm_steps=300, max_seconds=1, api_name="/tts")
    while running.status().code.name not in ("PROCESSING", "PROGRESS"):
        assert not running.done(), running.result()
        time.sleep(0.05)
    tab.generate()  # waits for the device: this server's queue (--queue-size 1) is now full
    tab.page.wait_for_function("window.statusSeen.some(s => s.startsWith('queue: 1/1'))")
    assert running.status().code.name in ("PROCESSING", "PROGRESS")
    refused = client.submit(text="One too many.", max_seconds=1, api_name="/tts")
    with pytest.raises(Exception, match="Queue is full"):
        refused.result()
    assert sf.info(tab.result(tmp_path / "queued.wav")).frames == N_FRAMES * 960
    assert running.result()[2].startswith("[talker] tts: 1.60 s audio")


def test_session_files_go_when_the_last_session_using_them_ends(app, tmp_path):
    cache = tmp_path / "cache"
    upload, sample, elsewhere = cache / "h1" / "voice.wav", cache / "h2" / "sample.wav", tmp_path / "mine.wav"
    for path in (upload, sample, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")
    files = app.SessionFiles(cache / "sessions", cache)
    files.keep = {str(sample.resolve())}
    first = files.folder("first", [upload, sample, elsewhere])
    (first / "t2av-0000.mp4").write_bytes(b"")
    files.folder("second", [upload])
    files.end("first")
    assert not first.exists() and upload.exists() and sample.exists() and elsewhere.exists()
    files.end("second")
    assert not upload.exists() and sample.exists() and elsewhere.exists()
    assert files.folder("../../escape").parent == cache / "sessions"  # a session id is never a path


# ---------------------------------------------------------------------------------------------- robustness

STOPPED = re.compile(r"^app\.py: stopped a (\w+) request \(([^)]*)\) at (.+) (\d+)/(\d+); it left no file$", re.M)


def _stops(server) -> list:
    """The server's lines for the generations it stopped: (mode, why, stage, done, total)."""
    return [(m, why, stage, int(done), int(total)) for m, why, stage, done, total in STOPPED.findall(server.log())]


def _wait_for_progress(job, at_least: int, stage: str):
    """The job's progress once `at_least` of `stage` (the pipeline's callback, as the page shows it) are done."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        for p in job.status().progress_data or []:
            if stage in (p.desc or "") and (p.index or 0) >= at_least:
                return p
        assert not job.done(), job.result()
        time.sleep(0.05)
    pytest.fail(f"no progress in {stage} within {HANG_GUARD_S} s")


def _session_files(server) -> set:
    """Every file in the server's session folders (outputs, and any hidden temporary one)."""
    return {p for p in server.tmp.glob("talker-app-*/sessions/**/*") if p.is_file()}


def _wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_api_cancel_stops_the_generation_at_its_next_patch(server, client):
    before = _session_files(server)
    job = client.submit(text="A request nobody wants.", cfm_steps=100, max_seconds=30, api_name="/tts")
    seen = _wait_for_progress(job, 2, "tts patches")  # 188 patches of 100 steps: far from its end
    n_stops = len(_stops(server))
    assert job.cancel()  # returns once the server's /cancel has answered
    # the answer waits for the generation to stop, so the next request never runs beside it
    (mode, why, stage, done, total), = _stops(server)[n_stops:]
    assert (mode, why, stage, total) == ("tts", "cancelled by its client", "tts patches", 188)
    assert seen.index <= done < total
    assert _session_files(server) == before  # nothing written, no temporary file left
    assert client.predict(text="The next one.", max_seconds=1, api_name="/tts")[2].startswith(
        "[talker] tts: 1.60 s audio")


CLIENT_THAT_GOES = """
import sys, time
from gradio_client import Client
job = Client(sys.argv[1], verbose=False).submit(text="A request whose client goes.", cfm_steps=100,
                                                max_seconds=30, api_name="/tts")
while not any((p.index or 0) >= 2 for p in job.status().progress_data or []):
    assert not job.done(), job.result()
    time.sleep(0.05)
print("running", flush=True)
time.sleep(600)
"""


def test_a_client_that_goes_away_stops_its_generation(server, client):
    before = _session_files(server)
    n_stops = len(_stops(server))
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    with subprocess.Popen([sys.executable, "-c", CLIENT_THAT_GOES, server.url], stdout=subprocess.PIPE, text=True,
                          env=env) as gone:
        assert gone.stdout.readline() == "running\n"
        gone.kill()  # its connections close without a word
    assert _wait_until(lambda: len(_stops(server)) > n_stops), "the generation ran on after its client went away"
    (mode, why, stage, done, total), = _stops(server)[n_stops:]
    assert (mode, why, stage) == ("tts", "its client went away", "tts patches") and done < total
    assert _wait_until(lambda: _session_files(server) == before)
    assert client.predict(text="The next one.", max_seconds=1, api_name="/tts")[2].startswith(
        "[talker] tts: 1.60 s audio")


def _rest_call(server, mode: str, **values) -> tuple:
    """One request through the REST API (JSON written here: it can carry what gradio_client cannot encode):
    (event, data) of its last message. Files are left to the defaults (None: the bundled samples)."""
    import urllib.request

    from gradio_client import Client

    params = Client(server.url, verbose=False).view_api(return_format="dict", print_info=False)[
        "named_endpoints"][f"/{mode}"]["parameters"]
    data = [values.get(p["parameter_name"], None if isinstance(p["parameter_default"], dict)
                       else p["parameter_default"]) for p in params]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    call = urllib.request.Request(f"{server.url}gradio_api/call/{mode}", data=json.dumps({"data": data}).encode(),
                                  headers={"Content-Type": "application/json"})
    event_id = json.load(opener.open(call, timeout=HANG_GUARD_S))["event_id"]
    stream = opener.open(f"{server.url}gradio_api/call/{mode}/{event_id}", timeout=HANG_GUARD_S).read().decode()
    event, data = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, re.M)[-1]
    return event, json.loads(data)


def _schema_line(**fields) -> str:
    """The line infer.py prints for a request the schema refuses, naming the field as the API does."""
    from runtime.request import GenerationRequest, RequestError

    with pytest.raises(RequestError) as err:
        GenerationRequest.from_mapping(fields).validate()
    return infer.message_of(err.value, in_batch_line=True)


def test_api_refuses_text_without_words_not_unicode_or_too_long(app, server, client):
    from gradio_client.exceptions import AppError

    for text in ("\u200b\u200c\ufeff", " \u2060\u00ad\n\u200d "):  # ZWSP ZWNJ BOM; word joiner, soft hyphen, ZWJ
        line = _schema_line(mode="tts", text=text)  # infer.py's check, shared
        assert line == "text: empty text: tts needs the words to speak"
        with pytest.raises(AppError) as err:
            client.predict(text=text, max_seconds=1, api_name="/tts")
        assert str(err.value) == line
    with pytest.raises(AppError, match=r"^text: too long for this server: 4999 characters, about 357 s of speech; "
                                       r"it takes at most 300 s .*; infer.py takes any length$"):
        client.predict(text="word " * 1000, max_seconds=1, cfm_steps=1, api_name="/tts")
    text = "Half a pair: \ud800."  # JSON carries a lone surrogate; gradio_client cannot encode it: the REST API
    event, data = _rest_call(server, "tts", text=text, max_seconds=1)
    assert (event, data["error"]) == ("error", _schema_line(mode="tts", text=text))
    assert "Traceback" not in server.log()


def test_text_length_limit(app):
    from runtime.request import RequestError

    app.check_text_length("a" * 4200, 300)  # 14 characters a second: 300 s
    app.check_text_length("語" * 1350, 300)  # CJK: 4.5 a second
    app.check_text_length("a" * 100 + " " * 10 ** 6, 300)  # spaces around a text do not count
    for text in ("a" * 4201, "語" * 1351, "a" * 10 ** 7):
        with pytest.raises(RequestError, match="^text: too long for this server"):
            app.check_text_length(text, 300)


def test_api_out_of_range_values_get_the_cli_line(app, server, client):
    from gradio_client.exceptions import AppError

    from runtime.request import GenerationRequest, RequestError

    for field, value in [("cfm_steps", 0), ("cfm_steps", 2.5), ("max_seconds", 31), ("cfm_cfg", -1), ("seed", -1),
                         ("cfm_temperature", "hot"), ("save_latents", "yes")]:
        with pytest.raises(RequestError) as cli:  # what infer.py checks, and prints naming --its-flag
            GenerationRequest.from_mapping({field: value}).validate()
        line = infer.message_of(cli.value, in_batch_line=True)  # the same line, naming the API's field
        with pytest.raises(AppError) as err:
            client.predict(text="Out of range.", api_name="/t2av", **{field: value})
        assert str(err.value) == line and line.startswith(f"{field}: ")
        assert f"app.py: error: {line}" in server.log()
    assert "Traceback" not in server.log()


class FakePipe:
    """generate() as the pipeline runs it: a progress callback per patch, the output written at the end."""
    is_demo = False

    def __init__(self, patches: int = 400, hook=None):
        self.patches, self.hook = patches, hook
        self.running = self.most_at_once = self.done = 0

    def generate(self, req, progress):
        import types

        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            for i in range(1, self.patches + 1):
                time.sleep(0.005)
                self.done = i
                progress("tts patches", i, self.patches)
            Path(req.output).write_bytes(b"RIFF")
            if self.hook:
                self.hook()
            return types.SimpleNamespace(wav_path=req.output, video_path=None, latents_path=None, warnings=[],
                                         summary=lambda: "[talker] tts")
        finally:
            self.running -= 1


def test_stopped_runs_end_at_their_next_patch_leave_no_file_and_never_overlap(app, tmp_path):
    import asyncio

    pipe = FakePipe()
    talker = app.TalkerApp(pipe, tmp_path)
    files = lambda: sorted(p.name for p in tmp_path.rglob("*") if p.is_file())  # noqa: E731

    def serve(session):
        return asyncio.create_task(talker.serve_request("tts", {"text": "Hi."}, lambda *a, **k: None, session))

    async def scenario():
        first = serve("one")
        while pipe.done < 3:
            await asyncio.sleep(0.01)
        first.cancel()  # what gradio's /cancel does
        second = serve("two")  # asked for at once: it waits for the device
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pipe.done < pipe.patches and files() == []
        while pipe.done < 3 or not pipe.running:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, talker.stop, "its client went away", "two")
        with pytest.raises(app.gr.Error, match="stopped: its client went away"):
            await second
        assert files() == [] and pipe.most_at_once == 1

        pipe.hook = lambda: talker.stop("it came too late", timeout=0)  # asked after the last patch
        with pytest.raises(app.gr.Error, match="stopped: it came too late"):
            await serve("three")
        assert files() == []  # its finished output removed
        pipe.hook = None
        assert talker.close() is True
        with pytest.raises(app.gr.Error, match="stopped: the server is stopping"):
            await serve("four")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as thread:  # a loop of its own: playwright's sync API runs one in this thread
        thread.submit(asyncio.run, scenario()).result()


CLI_WORDS = re.compile(r"--[a-z]|<output>|\.pt\b|samples/|\b(?:t2av|a2v|v2a|tts)\b|\(at most 30 s\)|Default:")


def test_each_tab_explains_its_inputs_in_its_own_words(app, client):
    shown = {}  # mode: {elem_id: (label, info)}
    for component in client.config["components"]:
        props = component.get("props", {})
        name, _, mode = (props.get("elem_id") or "").rpartition("-")
        if mode in app.TABS and name in app.FIELDS or name == "ref_image":
            shown.setdefault(mode, {})[name] = (props.get("label") or "", props.get("info") or "")
    assert sorted(shown) == sorted(app.TABS)
    inputs = {name for _, _, rows in app.TABS.values() for row in rows for name in row}
    option_labels = {label for texts in shown.values() for name, (label, _) in texts.items() if name not in inputs}
    for mode, texts in shown.items():
        labels = {label for label, _ in texts.values()}
        for name, (label, info) in texts.items():
            assert not CLI_WORDS.search(f"{label} {info}"), (mode, name, label, info)  # no flag, file, mode name
            for option in option_labels - labels:  # an option a text points to is one this tab shows
                assert not re.search(rf"\b{option}\b", info), (mode, name, option)
    assert shown["a2v"]["text"][0] == "transcript (optional)"
    assert "what is said in the video" in shown["v2a"]["text"][1]
    assert "300 s of speech" in shown["t2av"]["text"][1] and "300 s of speech" in shown["tts"]["text"][1]
    assert "motion" not in shown["tts"]["save_latents"][1] and "motion" in shown["t2av"]["save_latents"][1]


def test_readme_gradio_client_snippet_runs_as_written(server, tmp_path, monkeypatch):
    """The README's gradio_client block, pointed at this server's port, from a folder with samples/ beside it."""
    from test_readme_snippets import python_blocks

    (block,) = python_blocks((REPO / "README.md").read_text(), web_page=True)
    assert 'Client("http://127.0.0.1:7860/")' in block
    (tmp_path / "samples").symlink_to(REPO / "samples")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.replace("http://127.0.0.1:7860/", server.url), "README.md gradio block", "exec"), namespace)  # noqa: S102
    video = namespace["video"]
    path = video["video"] if isinstance(video, dict) else video
    assert Path(path).stat().st_size > 0 and "t2av" in namespace["report"]


# stops the module's server: keep it last
def test_sigterm_during_a_generation_stops_it_then_the_server_cleanly(server, client):
    job = client.submit(text="Rendering as the server stops.", cfm_steps=1, max_seconds=10, api_name="/t2av")
    _wait_for_progress(job, 1, "render")  # 264 frames to render: the abort came from a render cut short
    assert list(server.tmp.glob("talker-app-*"))  # uploads, outputs
    assert server.stop() == 128 + signal.SIGTERM  # as infer.py; not SIGABRT
    assert _stops(server)[-1][:3] == ("t2av", "the server is stopping", "render")
    assert not list(server.tmp.glob("talker-app-*"))
    log = server.log()
    assert "Traceback" not in log and "terminate called" not in log
    assert "app.py: SIGTERM after" in log

