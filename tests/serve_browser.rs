//! The review workstation in a real browser: headless Chromium driven over the Chrome DevTools
//! Protocol (a WebSocket; `tungstenite`), against the real `marrow serve` with the built-in model
//! on one bundled field. Opens the app, waits for the boxes, reclassifies one cell with the
//! keyboard, deletes one and draws one with the mouse, checks the counts on the page, exports
//! and reads the exported report, restarts the server and checks the corrections survived.
//!
//! Screenshots of the main views are written to `$MARROW_SCREENSHOTS` when set (this is how
//! docs/screenshots/ is made: `MARROW_SCREENSHOTS=docs/screenshots cargo test --test
//! serve_browser`), else to a temporary folder.
//!
//! Without a Chromium binary the test is skipped with a loud message, unless
//! `MARROW_REQUIRE_BROWSER=1` (set by .ci/run, which installs Chromium), where it fails.

mod serve_common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::{case_dir, example_folder, tmp_dir, Server};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MARROW_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
        "/usr/bin/google-chrome-stable",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A headless Chromium and one page's DevTools connection.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Uncaught JavaScript exceptions the page threw (none expected).
    exceptions: Vec<String>,
    /// The browser's error log (CSP violations, failed loads), printed for diagnosis.
    log_errors: Vec<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call("Browser.close", json!({}));
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(exe: &Path, profile: &Path) -> Browser {
        let mut child = Command::new(exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1600,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stderr = child.stderr.take().unwrap();
        // Killed on any failure below (a panic before `Browser` exists would leave it running).
        let mut guard = ChildGuard(Some(child));
        // Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID".
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("Chromium printed no DevTools address");
        let port: u16 = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|hp| hp.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("DevTools port");
        // The page target's own WebSocket (Runtime, Input and Page commands go to a page).
        let t = Instant::now();
        let page_ws = loop {
            let list = serve_common::request(port, "GET", "/json/list", &[], None).json();
            if let Some(p) = list
                .as_array()
                .and_then(|l| l.iter().find(|t| t["type"] == "page"))
            {
                break p["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no page target");
            std::thread::sleep(Duration::from_millis(200));
        };
        let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        }
        let mut b = Browser {
            child: guard.0.take().unwrap(),
            ws,
            next_id: 1,
            exceptions: Vec::new(),
            log_errors: Vec::new(),
        };
        b.call("Page.enable", json!({})).unwrap();
        b.call("Log.enable", json!({})).unwrap();
        b.call("Runtime.enable", json!({})).unwrap();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .unwrap();
        b
    }

    /// One CDP command; its `result`, or the protocol's error.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::Text(msg.into()))
            .map_err(|e| e.to_string())?;
        loop {
            let m = self.ws.read().map_err(|e| format!("{method}: {e}"))?;
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
            match v["method"].as_str() {
                Some("Runtime.exceptionThrown") => self
                    .exceptions
                    .push(v["params"]["exceptionDetails"].to_string()),
                Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" => self
                    .log_errors
                    .push(v["params"]["entry"]["text"].to_string()),
                _ => {}
            }
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    return Err(format!("{method}: {e}"));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates JavaScript in the page (promises awaited); its value as JSON.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .unwrap();
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("{expr}: {ex}");
        }
        r["result"]["value"].clone()
    }

    fn wait_for(&mut self, what: &str, expr: &str, timeout_s: u64) -> Value {
        let t = Instant::now();
        loop {
            let v = self.eval(&format!(
                "(() => {{ try {{ return {expr}; }} catch (e) {{ return null; }} }})()"
            ));
            if !(v.is_null() || v == false) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(timeout_s),
                "waited {timeout_s} s for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).unwrap();
    }

    /// A key press as a person makes it (keyDown with its text, keyUp).
    fn key(&mut self, key: &str) {
        let (code, vk, text) = match key {
            "Tab" => ("Tab".to_string(), 9, None),
            "Enter" => ("Enter".to_string(), 13, Some("\r")),
            "Escape" => ("Escape".to_string(), 27, None),
            k if k.len() == 1 && k.as_bytes()[0].is_ascii_digit() => {
                (format!("Digit{k}"), k.as_bytes()[0] as u32, Some(k))
            }
            k if k.len() == 1 => (
                format!("Key{}", k.to_ascii_uppercase()),
                k.to_ascii_uppercase().as_bytes()[0] as u32,
                Some(k),
            ),
            k => panic!("key {k:?}"),
        };
        let mut down = json!({"type": "keyDown", "key": key, "code": code,
                              "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down).unwrap();
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk}),
        )
        .unwrap();
    }

    fn mouse(&mut self, kind: &str, x: f64, y: f64) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": kind, "x": x, "y": y, "button": "left",
                   "buttons": if kind == "mouseReleased" { 0 } else { 1 }, "clickCount": 1}),
        )
        .unwrap();
    }

    fn click_selector(&mut self, sel: &str) {
        let r = self.eval(&format!(
            "(() => {{ const r = document.querySelector({sel:?}).getBoundingClientRect(); \
             return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        self.mouse("mousePressed", x, y);
        self.mouse("mouseReleased", x, y);
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .unwrap();
        let png = base64_decode(r["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

/// Kills a child process when dropped, unless taken.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The page's reading of the current field: cells, selection, totals.
fn page_state(b: &mut Browser) -> Value {
    b.eval(
        "({sel: marrow.S.sel, cells: marrow.S.image.cells, lastLabel: marrow.S.lastLabel, \
          imgTotal: +document.getElementById('img-total').textContent, \
          caseTotal: +document.getElementById('case-total').textContent, \
          classes: Object.fromEntries([...document.querySelectorAll('#image-counts tr[data-class]')] \
             .map(r => [r.dataset.class, +r.querySelector('td.n').textContent])), \
          target: document.getElementById('target-status').textContent})",
    )
}

fn cell<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no cell {id} on the page"))
}

#[test]
fn review_in_a_real_browser() {
    let Some(exe) = find_chromium() else {
        if std::env::var("MARROW_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
            panic!("MARROW_REQUIRE_BROWSER=1 but no Chromium found (apt-get install chromium, or set MARROW_CHROMIUM)");
        }
        eprintln!("\n==============================================================");
        eprintln!("SKIPPED serve_browser: no Chromium binary found (/usr/bin/chromium).");
        eprintln!("Install it (apt-get install chromium) or set MARROW_CHROMIUM=PATH.");
        eprintln!("==============================================================\n");
        return;
    };
    let t0 = Instant::now();
    let shots = std::env::var_os("MARROW_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp_dir("browser-shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let folder = example_folder("browser", 2);
    let args = [folder.to_str().unwrap(), "--target", "30"];
    let server = Server::start(&args);
    server.wait_counted(600);
    let api_view = server.get_json("/api/cases/0/images/0");
    // The second field's count adds to the case tally.
    let t_other = server.get_json("/api/cases/0/images/1")["count"]["total"]
        .as_u64()
        .unwrap();

    let profile = tmp_dir("browser-profile");
    let mut b = Browser::launch(&exe, &profile);
    b.navigate(&server.url("/"));
    b.wait_for(
        "the boxes",
        "window.marrow.ready && marrow.S.img && marrow.S.image.cells.length > 0 && marrow.S.sel",
        120,
    );
    assert!(b
        .eval("document.body.textContent.includes('For research use only')")
        .as_bool()
        .unwrap());

    // The reviewer's name, typed.
    b.eval("document.getElementById('reviewer').focus()");
    b.call("Input.insertText", json!({"text": "Dr Browser"}))
        .unwrap();
    b.key("Enter");

    // The model's output as the reviewer first sees it (the first cell selected), once the
    // queue bar's animation has ended.
    std::thread::sleep(Duration::from_millis(500));
    b.screenshot(&shots.join("review.png"));
    let s0 = page_state(&mut b);
    assert_eq!(s0["imgTotal"], api_view["count"]["total"]);
    let t_model = s0["imgTotal"].as_u64().unwrap();

    // Reclassify the selected cell with a number key; the selection moves on.
    let a = s0["sel"]["cell"].as_str().unwrap().to_string();
    let a_label = cell(&s0, &a)["label"].as_u64().unwrap();
    let a_counted = cell(&s0, &a)["counted"] == true;
    let new_label = a_label % 3 + 1;
    b.key(&new_label.to_string());
    b.wait_for(
        "the reclassification",
        &format!("marrow.S.image.cells.find(c => c.id === '{a}').label === {new_label} && marrow.S.sel.cell !== '{a}'"),
        30,
    );

    // Delete the next cell with x.
    let s1 = page_state(&mut b);
    let del = s1["sel"]["cell"].as_str().unwrap().to_string();
    let del_counted = cell(&s1, &del)["counted"] == true;
    b.key("x");
    b.wait_for(
        "the deletion",
        &format!("marrow.S.image.cells.find(c => c.id === '{del}').deleted"),
        30,
    );

    // Draw a missed cell: b, then drag on the field.
    b.key("b");
    let (w, h) = (
        api_view["width"].as_f64().unwrap(),
        api_view["height"].as_f64().unwrap(),
    );
    let pts = b.eval(&format!(
        "(() => {{ const r = document.getElementById('view').getBoundingClientRect(); \
         const p = marrow.toScreen({}, {}), q = marrow.toScreen({}, {}); \
         return [r.left + p[0], r.top + p[1], r.left + q[0], r.top + q[1]]; }})()",
        w * 0.45,
        h * 0.45,
        w * 0.45 + 28.0,
        h * 0.45 + 26.0
    ));
    let p: Vec<f64> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    b.mouse("mousePressed", p[0], p[1]);
    b.mouse("mouseMoved", (p[0] + p[2]) / 2.0, (p[1] + p[3]) / 2.0);
    b.mouse("mouseMoved", p[2], p[3]);
    b.mouse("mouseReleased", p[2], p[3]);
    b.wait_for(
        "the drawn cell",
        "marrow.S.image.cells.some(c => c.id === 'a1')",
        30,
    );

    // The counts on the page: the model's, corrected by exactly these three edits, and equal to
    // the server's.
    let expected = t_model + u64::from(!a_counted) - u64::from(del_counted) + 1;
    let case_expected = expected + t_other;
    b.wait_for(
        "the tally",
        &format!(
            "+document.getElementById('img-total').textContent === {expected} && \
             +document.getElementById('case-total').textContent === {case_expected}"
        ),
        30,
    );
    assert!(b
        .eval("document.getElementById('target-status').textContent")
        .as_str()
        .unwrap()
        .contains(if case_expected >= 30 {
            "Target reached"
        } else {
            "more cells"
        }));
    let s2 = page_state(&mut b);
    assert_eq!(
        cell(&s2, "a1")["label"],
        new_label,
        "drawn with the last class used"
    );
    let api_now = server.get_json("/api/cases/0/images/0");
    for (class, n) in s2["classes"].as_object().unwrap() {
        assert_eq!(&api_now["count"]["counts"][class], n, "{class}");
    }
    assert_eq!(api_now["count"]["total"], expected);
    // The confirmation toast would cover the field in the screenshots.
    b.eval("document.getElementById('toast').hidden = true");

    // The gallery: crops of every cell, per class.
    b.key("g");
    b.wait_for(
        "the gallery",
        "document.querySelectorAll('.crop').length > 5",
        30,
    );
    std::thread::sleep(Duration::from_millis(500));
    b.screenshot(&shots.join("gallery.png"));
    b.key("Escape");

    // Uncertain-only at native resolution.
    b.key("f");
    b.key("z");
    std::thread::sleep(Duration::from_millis(300));
    b.screenshot(&shots.join("uncertain-native.png"));
    b.key("f");
    b.key("0");

    // Export the corrected report with the button, and read the file it wrote.
    b.click_selector("[data-export=json]");
    b.wait_for(
        "the export",
        "document.querySelector('#export-messages li.ok')",
        30,
    );
    let exported = case_dir(&folder).join("exports/reviewed-report.json");
    let rr: Value = serde_json::from_str(&std::fs::read_to_string(&exported).unwrap()).unwrap();
    assert_eq!(rr["summary"]["total"], case_expected);
    assert_eq!(rr["images"][0]["total"], expected);
    assert_eq!(rr["summary"]["target"], 30);
    assert!(rr["provenance"]["notice"]
        .as_str()
        .unwrap()
        .contains("For research use only"));
    assert_eq!(rr["review"]["reviewers"], json!(["Dr Browser"]));
    let changes = rr["review"]["changes"].as_array().unwrap();
    for (id, kind) in [
        (&a, None),
        (&del, Some("deleted")),
        (&"a1".to_string(), Some("added")),
    ] {
        let c = changes
            .iter()
            .find(|c| c["cell"] == id.as_str())
            .unwrap_or_else(|| panic!("no change for {id}: {changes:?}"));
        if let Some(k) = kind {
            assert_eq!(c["change"], k);
        }
    }

    // Keyboard flow through the case: Tab past the field's last cell opens the next field,
    // `[` goes back.
    let left = b
        .eval(
            "(() => { const o = marrow.ordered(marrow.S.image); \
             return o.length - o.findIndex(c => c.id === marrow.S.sel.cell); })()",
        )
        .as_u64()
        .unwrap();
    for _ in 0..left {
        b.key("Tab");
    }
    b.wait_for(
        "the next field",
        "marrow.S.idx === 1 && marrow.S.image.index === 1 && marrow.S.sel.image === 1",
        30,
    );
    b.key("[");
    b.wait_for(
        "the first field again",
        "marrow.S.idx === 0 && marrow.S.image.index === 0",
        30,
    );

    // Sign the case off with the button.
    b.click_selector("#signoff-btn");
    b.wait_for(
        "the sign-off",
        "document.getElementById('signoff-status').classList.contains('done')",
        30,
    );
    assert_eq!(
        server.get_json("/api/cases/0")["signoff"]["reviewer"],
        "Dr Browser"
    );

    // A bad upload through the page's file input: a clear message in the page, nothing added.
    let bad = tmp_dir("browser-upload").join("notes.png");
    std::fs::write(&bad, "these are notes, not pixels").unwrap();
    let input = b
        .call(
            "Runtime.evaluate",
            json!({"expression": "document.getElementById('file-input')"}),
        )
        .unwrap();
    b.call(
        "DOM.setFileInputFiles",
        json!({"files": [bad.to_str().unwrap()], "objectId": input["result"]["objectId"]}),
    )
    .unwrap();
    let msg = b.wait_for(
        "the upload's error message",
        "document.querySelector('#upload-messages li.error')?.textContent",
        30,
    );
    assert!(msg.as_str().unwrap().contains("notes.png"), "{msg}");
    assert_eq!(
        server.get_json("/api/cases/0")["images"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Restart the server; the page reopens on the new address with every correction.
    drop(server);
    let server = Server::start(&args);
    b.navigate(&server.url("/"));
    b.wait_for(
        "the boxes after restart",
        "window.marrow.ready && marrow.S.img && marrow.S.image.cells.length > 0",
        120,
    );
    let s3 = page_state(&mut b);
    assert_eq!(cell(&s3, &a)["label"], new_label);
    assert_eq!(cell(&s3, &del)["deleted"], true);
    assert_eq!(cell(&s3, "a1")["deleted"], false);
    assert_eq!(s3["imgTotal"], expected);
    assert_eq!(s3["caseTotal"], case_expected);
    assert!(b
        .eval("document.getElementById('signoff-status').textContent")
        .as_str()
        .unwrap()
        .contains("Reviewed by Dr Browser"));
    for e in &b.log_errors {
        eprintln!("browser log: {e}");
    }
    assert!(
        b.exceptions.is_empty(),
        "the page threw: {:?}",
        b.exceptions
    );
    eprintln!("browser review test: {:.1} s", t0.elapsed().as_secs_f64());
    drop(b);
    drop(server);
    serve_common::clean(&[&profile, folder.parent().unwrap(), bad.parent().unwrap()]);
    if std::env::var_os("MARROW_SCREENSHOTS").is_none() {
        serve_common::clean(&[&shots]);
    }
}
