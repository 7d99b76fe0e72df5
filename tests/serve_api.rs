//! `marrow serve` over HTTP: the real binary with the built-in model on one bundled field.
//! Count, correct (reclassify, delete, draw, accept, undo/redo), conflicts, sign-off, every
//! export read back with marrow's own readers, replay after SIGKILL; and everything the server
//! must refuse: path traversal, links out of the folder, other hosts and origins, bad and
//! oversized uploads, exposure without a token.

mod serve_common;

use std::path::Path;

use serde_json::{json, Value};
use serve_common::{case_dir, example_folder, request, tmp_dir, Server};

use marrow::count::document::{Report, ReviewedReport};
use marrow::eval::labels::{parse_yolo_label, read_coco_json, YoloClassMap};

fn cells(view: &Value) -> &Vec<Value> {
    view["cells"].as_array().expect("cells")
}

fn cell<'a>(view: &'a Value, id: &str) -> &'a Value {
    cells(view)
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no cell {id}"))
}

fn total(view: &Value) -> u64 {
    view["count"]["total"].as_u64().unwrap()
}

fn class_count(view: &Value, class: &str) -> u64 {
    view["count"]["counts"][class].as_u64().unwrap()
}

fn snap(c: &Value) -> Value {
    json!({"bbox": c["bbox"], "label": c["label"], "class": c["class"],
           "counted": c["counted"], "deleted": c["deleted"]})
}

/// The counted, undeleted cells of a view, recounted here (the server's count must agree).
fn counted_cells(view: &Value) -> u64 {
    cells(view)
        .iter()
        .filter(|c| c["counted"] == true && c["deleted"] == false)
        .count() as u64
}

#[test]
fn review_cycle_over_http() {
    let folder = example_folder("cycle", 1);
    let mut server = Server::start(&[folder.to_str().unwrap(), "--target", "20"]);

    // The page and its assets come from the binary.
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("For research use only"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'self'")));
    for a in ["/app.js", "/app.css", "/favicon.svg"] {
        assert_eq!(server.get(a).status, 200, "{a}");
    }

    let session = server.get_json("/api/session");
    let classes: Vec<String> = session["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(classes, ["WBC", "RBC", "platelet"]);
    assert!(session["notice"]
        .as_str()
        .unwrap()
        .contains("For research use only"));

    let case = server.wait_counted(600);
    assert_eq!(case["images"][0]["status"]["state"], "done", "{case}");
    let v0 = server.get_json("/api/cases/0/images/0");
    assert!(cells(&v0).len() >= 5, "few detections: {v0}");
    assert_eq!(total(&v0), counted_cells(&v0));
    let model_total = total(&v0);

    let edit = |body: Value| server.post_json("/api/cases/0/images/0/edit", &body);
    let who = "Dr Test";

    // No reviewer name: refused, with the reason.
    let r = edit(json!({"op": "delete", "cell": "d0"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("name"));

    // Reclassify the top detection to another class.
    let c0 = cell(&v0, "d0").clone();
    assert_eq!(c0["counted"], true);
    let old_class = c0["class"].as_str().unwrap().to_string();
    let new_label = if c0["label"] == 1 { 2 } else { 1 };
    let new_class = classes[new_label - 1].clone();
    let r = edit(
        json!({"op": "reclassify", "cell": "d0", "label": new_label, "reviewer": who, "expect": snap(&c0)}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v1 = r.json();
    assert_eq!(cell(&v1, "d0")["class"], new_class.as_str());
    assert_eq!(cell(&v1, "d0")["changed"], true);
    assert_eq!(total(&v1), model_total);
    assert_eq!(
        class_count(&v1, &old_class) + 1,
        class_count(&v0, &old_class)
    );
    assert_eq!(
        class_count(&v1, &new_class),
        class_count(&v0, &new_class) + 1
    );

    // A stale `expect` (another tab) is a conflict, not an overwrite.
    let r = edit(json!({"op": "delete", "cell": "d0", "reviewer": who, "expect": snap(&c0)}));
    assert_eq!(r.status, 409, "{}", r.text());

    // Delete a false positive.
    let c1 = cell(&v1, "d1").clone();
    assert_eq!(c1["counted"], true);
    let v2 = edit(json!({"op": "delete", "cell": "d1", "reviewer": who})).json();
    assert_eq!(cell(&v2, "d1")["deleted"], true);
    assert_eq!(total(&v2), model_total - 1);

    // Draw a missed cell.
    let r = edit(json!({"op": "add", "bbox": [5.0, 6.0, 40.5, 41.0], "label": 3, "reviewer": who}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v3 = r.json();
    assert_eq!(v3["edited"], "a1");
    assert_eq!(cell(&v3, "a1")["class"], "platelet");
    assert_eq!(cell(&v3, "a1")["score"], Value::Null);
    assert_eq!(total(&v3), model_total);
    assert_eq!(total(&v3), counted_cells(&v3));

    // Undo and redo the reclassification (the page's inverse events).
    let before = snap(&c0);
    let after = snap(cell(&v3, "d0"));
    let v =
        edit(json!({"op": "undo", "cell": "d0", "to": before, "expect": after, "reviewer": who}))
            .json();
    assert_eq!(cell(&v, "d0")["class"], old_class.as_str());
    let v =
        edit(json!({"op": "redo", "cell": "d0", "to": after, "expect": before, "reviewer": who}))
            .json();
    assert_eq!(cell(&v, "d0")["class"], new_class.as_str());

    // An uncounted (below-threshold) detection accepted as it is, when there is one.
    let accepted = cells(&v)
        .iter()
        .find(|c| c["counted"] == false && c["deleted"] == false)
        .map(|c| c["id"].as_str().unwrap().to_string());
    if let Some(id) = &accepted {
        let v = edit(json!({"op": "accept", "cell": id, "reviewer": who})).json();
        assert_eq!(cell(&v, id)["counted"], true);
        assert_eq!(total(&v), model_total + 1);
    }

    // Bad edits: each refused with a reason, nothing logged.
    let events_before = server.get_json("/api/cases/0")["audit_events"].clone();
    for (body, status) in [
        (
            json!({"op": "reclassify", "cell": "d2", "label": 9, "reviewer": who}),
            400,
        ),
        (
            json!({"op": "reclassify", "cell": "d999", "label": 1, "reviewer": who}),
            404,
        ),
        (
            json!({"op": "add", "bbox": [5, 5, 5.5, 5.5], "label": 1, "reviewer": who}),
            400,
        ),
        (json!({"op": "add", "label": 1, "reviewer": who}), 400),
        (json!({"op": "explode", "cell": "d2", "reviewer": who}), 400),
    ] {
        let r = edit(body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let r = server.post_json(
        "/api/cases/0/images/7/edit",
        &json!({"op": "accept", "cell": "d0", "reviewer": who}),
    );
    assert_eq!(r.status, 404);
    let r = request(
        server.port,
        "POST",
        "/api/cases/0/images/0/edit",
        &[("Content-Type", "application/json")],
        Some(b"{not json"),
    );
    assert_eq!(r.status, 400);
    // A form post (what a cross-site page can send without a preflight) is not JSON: refused.
    let r = request(
        server.port,
        "POST",
        "/api/cases/0/images/0/edit",
        &[("Content-Type", "text/plain")],
        Some(br#"{"op":"delete","cell":"d2","reviewer":"x"}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        server.get_json("/api/cases/0")["audit_events"],
        events_before
    );

    // A good upload joins the case and is counted.
    let second = std::fs::read(
        Path::new(serve_common::EXAMPLES).join("4156c90548ee503e98cb2bf947312eff.png"),
    )
    .unwrap();
    let r = request(
        server.port,
        "POST",
        "/api/cases/0/upload?name=..%2Fnested%2Ffield%202.png&reviewer=Dr%20Test",
        &[("Content-Type", "application/octet-stream")],
        Some(&second),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let up = r.json();
    let key = up["key"].as_str().unwrap().to_string();
    assert!(
        key.starts_with("uploads/") && key.ends_with("-field_2.png"),
        "{key}"
    );
    assert!(case_dir(&folder).join(&key).is_file());
    let case = server.wait_counted(300);
    assert_eq!(case["images"].as_array().unwrap().len(), 2);
    assert_eq!(case["images"][1]["status"]["state"], "done");
    // The same bytes again: recognised, not added twice.
    let r = request(
        server.port,
        "POST",
        "/api/cases/0/upload?name=again.png",
        &[("Content-Type", "application/octet-stream")],
        Some(&second),
    );
    assert_eq!(r.json()["duplicate"], true);

    // The tally over the case is the library's sum of the reviewed images.
    let case = server.get_json("/api/cases/0?target=20");
    let v0 = server.get_json("/api/cases/0/images/0");
    let v1 = server.get_json("/api/cases/0/images/1");
    let tally = case["summary"]["total"].as_u64().unwrap();
    assert_eq!(tally, total(&v0) + total(&v1));
    assert_eq!(case["summary"]["target"], 20);
    assert_eq!(case["summary"]["target_reached"], tally >= 20);

    // Exports, read back with marrow's own readers.
    let exports = case_dir(&folder).join("exports");
    let r = server.post_json(
        "/api/cases/0/export",
        &json!({"format": "json", "target": 20}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["download"],
        "/api/cases/0/exports/reviewed-report.json"
    );
    let path = exports.join("reviewed-report.json");
    let rr: ReviewedReport =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Still an ordinary count report to every tool that reads one.
    let plain = Report::read(&path).unwrap();
    assert_eq!(plain.summary, rr.report.summary);
    assert_eq!(rr.report.summary.total as u64, tally);
    assert!(rr
        .report
        .provenance
        .notice
        .contains("For research use only"));
    assert_eq!(rr.report.provenance.model.sha256.len(), 64);
    assert_eq!(rr.review.status, "in review");
    assert_eq!(rr.review.reviewers, ["Dr Test"]);
    let kinds: Vec<&str> = rr
        .review
        .changes
        .iter()
        .map(|c| c.change.as_str())
        .collect();
    assert!(
        kinds.contains(&"reclassified") && kinds.contains(&"deleted") && kinds.contains(&"added"),
        "{kinds:?}"
    );
    let re = rr
        .review
        .changes
        .iter()
        .find(|c| c.change == "reclassified")
        .unwrap();
    assert_eq!(re.model.as_ref().unwrap().class, old_class);
    assert_eq!(re.reviewed.as_ref().unwrap().class, new_class);
    assert_eq!(
        rr.review.model_summary.total as u64,
        model_total + total(&v1)
    );

    let r = server.post_json("/api/cases/0/export", &json!({"format": "csv"}));
    assert_eq!(r.status, 200);
    let csv = std::fs::read_to_string(exports.join("reviewed-report.csv")).unwrap();
    assert!(csv.starts_with("file,width,height,status,total,WBC,RBC,platelet"));
    assert!(csv.contains(&format!("TOTAL,,,total,{tally},")), "{csv}");
    let dl = server.get("/api/cases/0/exports/reviewed-report.csv");
    assert_eq!(dl.status, 200);
    assert!(dl
        .header("content-disposition")
        .unwrap()
        .contains("attachment"));
    assert_eq!(dl.text(), csv);

    let with_bg: Vec<String> = ["__background__", "WBC", "RBC", "platelet"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        server
            .post_json("/api/cases/0/export", &json!({"format": "coco"}))
            .status,
        200
    );
    let coco = read_coco_json(&exports.join("coco-ground-truth.json"), &with_bg).unwrap();
    assert_eq!(coco.gt.iter().map(Vec::len).sum::<usize>() as u64, tally);
    for im in &coco.images {
        assert!(exports.join(&im.file_name).is_file(), "{}", im.file_name);
    }
    assert_eq!(
        server
            .post_json("/api/cases/0/export", &json!({"format": "yolo"}))
            .status,
        200
    );
    let yolo = exports.join("yolo");
    assert_eq!(
        std::fs::read_to_string(yolo.join("classes.txt")).unwrap(),
        "WBC\nRBC\nplatelet\n"
    );
    let map = YoloClassMap::new(&with_bg, None);
    let mut yolo_cells = 0;
    for im in &coco.images {
        let stem = Path::new(&im.file_name)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let lab = yolo.join("labels/reviewed").join(format!("{stem}.txt"));
        let gt = parse_yolo_label(
            &std::fs::read(&lab).unwrap(),
            "yolo",
            im.width,
            im.height,
            &map,
        )
        .unwrap();
        yolo_cells += gt.len();
    }
    assert_eq!(yolo_cells as u64, tally);
    assert_eq!(
        server
            .post_json("/api/cases/0/export", &json!({"format": "pdf"}))
            .status,
        400
    );
    assert_eq!(server.get("/api/cases/0/exports/audit.jsonl").status, 404);

    // Sign-off: needs a name; freezes the case until reopened.
    assert_eq!(
        server.post_json("/api/cases/0/signoff", &json!({})).status,
        400
    );
    let r = server.post_json("/api/cases/0/signoff", &json!({"reviewer": who}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["signoff"]["reviewer"], who);
    assert_eq!(
        edit(json!({"op": "delete", "cell": "d2", "reviewer": who})).status,
        409
    );
    server.post_json("/api/cases/0/export", &json!({"format": "json"}));
    let rr: ReviewedReport =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(rr.review.status, "signed off");
    assert_eq!(rr.review.signed_off_by.as_deref(), Some(who));
    assert_eq!(
        server
            .post_json("/api/cases/0/reopen", &json!({"reviewer": who}))
            .status,
        200
    );
    assert_eq!(
        edit(json!({"op": "delete", "cell": "d2", "reviewer": who})).status,
        200
    );
    assert_eq!(
        server
            .post_json("/api/cases/0/signoff", &json!({"reviewer": who}))
            .status,
        200
    );

    // The audit log: one line per acknowledged change, with time, reviewer, before and after.
    let log = std::fs::read_to_string(case_dir(&folder).join("audit.jsonl")).unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let n_case = server.get_json("/api/cases/0")["audit_events"]
        .as_u64()
        .unwrap();
    assert_eq!(events.len() as u64, n_case);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(!e["reviewer"].as_str().unwrap().is_empty());
    }
    let first = events.iter().find(|e| e["op"] == "reclassify").unwrap();
    assert_eq!(first["before"]["class"], old_class.as_str());
    assert_eq!(first["after"]["class"], new_class.as_str());

    // SIGKILL and restart: the state is rebuilt from the model output and the log.
    let views_before: Vec<Value> = (0..2)
        .map(|i| server.get_json(&format!("/api/cases/0/images/{i}")))
        .collect();
    let case_before = server.get_json("/api/cases/0");
    server.kill();
    let server = Server::start(&[folder.to_str().unwrap(), "--target", "20"]);
    let case_after = server.get_json("/api/cases/0");
    assert_eq!(case_after["images"], case_before["images"]);
    assert_eq!(case_after["summary"], case_before["summary"]);
    assert_eq!(case_after["signoff"], case_before["signoff"]);
    for (i, vb) in views_before.iter().enumerate() {
        let va = server.get_json(&format!("/api/cases/0/images/{i}"));
        assert_eq!(&va, vb, "image {i} after restart");
    }
    // Nothing was recounted: the images are reviewable at once.
    assert!(
        server.stderr().contains("(2 images, 0 to count)"),
        "{}",
        server.stderr()
    );

    // Without its model output the case is counted again and the log replayed onto the same
    // detections (same model, same ids).
    drop(server);
    std::fs::remove_file(case_dir(&folder).join("model-output.json")).unwrap();
    let server = Server::start(&[folder.to_str().unwrap(), "--target", "20"]);
    assert!(server.stderr().contains("(2 images, 2 to count)"));
    server.wait_counted(300);
    for (i, vb) in views_before.iter().enumerate() {
        let va = server.get_json(&format!("/api/cases/0/images/{i}"));
        assert_eq!(&va, vb, "image {i} after recounting");
    }
    drop(server);
    serve_common::clean(&[folder.parent().unwrap()]);
}

#[test]
fn refuses_what_it_must() {
    let folder = example_folder("refuse", 1);
    let outside = tmp_dir("refuse-outside");
    let secret = outside.join("secret.png");
    std::fs::copy(
        Path::new(serve_common::EXAMPLES).join("5d84ae894ae850a384951221509f61ea.png"),
        &secret,
    )
    .unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, folder.join("link-out.png")).unwrap();
    // A TIFF, which browsers cannot show: served as PNG.
    std::fs::create_dir_all(folder.join("scans")).unwrap();
    std::fs::copy(
        "tests/bad_inputs/images/rgb16.tif",
        folder.join("scans/rgb16.tif"),
    )
    .unwrap();
    let server = Server::start(&[folder.to_str().unwrap(), "--max-upload-mb", "1"]);

    let case = server.get_json("/api/cases/0");
    assert_eq!(case["images"].as_array().unwrap().len(), 2, "{case}");
    assert_eq!(case["images"][1]["key"], "scans/rgb16.tif");
    #[cfg(unix)]
    assert!(
        case["refused"][0]
            .as_str()
            .unwrap()
            .contains("link-out.png"),
        "{case}"
    );

    // Traversal: no request reaches a file outside the case.
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/%2e%2e/Cargo.toml",
        "/..%2f..%2fCargo.toml",
        "/app.js/../../Cargo.toml",
        "/api/cases/0/images/..%2f..%2fetc%2fpasswd/file",
        "/api/cases/0/images/-1/file",
        "/api/cases/0/images/2/file",
        "/api/cases/9/images/0/file",
        "/api/cases/0/exports/..%2faudit.jsonl",
        "/api/cases/0/exports/%2fetc%2fpasswd",
        "/etc/passwd",
        "//etc/passwd",
    ] {
        let r = server.get(path);
        assert!(r.status >= 400, "{path}: {} {}", r.status, r.text());
        assert!(
            !r.text().contains("[package]") && !r.text().contains("root:"),
            "{path}"
        );
    }
    // The one image is served, and only as itself.
    let img = server.get("/api/cases/0/images/0/file");
    assert_eq!(img.status, 200);
    assert_eq!(img.header("content-type"), Some("image/jpeg"));
    let tif = server.get("/api/cases/0/images/1/file");
    assert_eq!(tif.status, 200);
    assert_eq!(tif.header("content-type"), Some("image/png"));
    let png = image::load_from_memory(&tif.body).unwrap();
    assert_eq!((png.width(), png.height()), (44, 34));

    // DNS rebinding and CSRF: another Host, or a change from another origin, is refused.
    let r = request(
        server.port,
        "GET",
        "/api/session",
        &[("Host", "evil.example:8600")],
        None,
    );
    assert_eq!(r.status, 403);
    let r = request(
        server.port,
        "POST",
        "/api/cases/0/signoff",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "http://evil.example"),
        ],
        Some(br#"{"reviewer":"mallory"}"#),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        server.port,
        "GET",
        "/",
        &[("Host", &format!("localhost:{}", server.port))],
        None,
    );
    assert_eq!(r.status, 200);
    // Loopback names on any port (an SSH tunnel's local port) are this server; look-alikes
    // are not.
    let r = request(server.port, "GET", "/", &[("Host", "localhost:9000")], None);
    assert_eq!(r.status, 200);
    for host in [
        "127.0.0.1.evil.example",
        "evil.example",
        "localhost.evil.example:80",
    ] {
        let r = request(server.port, "GET", "/", &[("Host", host)], None);
        assert_eq!(r.status, 403, "{host}");
    }

    // Bad uploads: a clear message each, nothing added, and the server goes on.
    let up = |name: &str, bytes: &[u8]| {
        request(
            server.port,
            "POST",
            &format!("/api/cases/0/upload?name={name}"),
            &[("Content-Type", "application/octet-stream")],
            Some(bytes),
        )
    };
    let bad = Path::new("tests/bad_inputs/images");
    for (name, bytes, want) in [
        ("notes.txt", b"these are not pixels".to_vec(), "notes.txt"),
        (
            "bomb.png",
            std::fs::read(bad.join("bomb_16384x16384.png")).unwrap(),
            "bomb.png",
        ),
        (
            "bomb.jpg",
            std::fs::read(bad.join("bomb_16000x16000.jpg")).unwrap(),
            "bomb.jpg",
        ),
        (
            "cut.jpg",
            std::fs::read(bad.join("truncated.jpg")).unwrap(),
            "cut.jpg",
        ),
        (
            "anim.gif",
            std::fs::read(bad.join("animated.gif")).unwrap(),
            "anim.gif",
        ),
    ] {
        let r = up(name, &bytes);
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains(want) && msg.contains("Nothing was added"),
            "{name}: {msg}"
        );
    }
    let r = up("empty.png", b"");
    assert_eq!(r.status, 400);
    let big = vec![0u8; (1 << 20) + 10];
    let r = up("huge.png", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("upload limit of 1 MiB"));
    assert_eq!(
        server.get_json("/api/cases/0")["images"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        std::fs::read_dir(case_dir(&folder).join("uploads"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(server.get("/api/session").status, 200);
    drop(server);
    serve_common::clean(&[folder.parent().unwrap(), &outside]);
}

#[test]
fn exposure_needs_a_token() {
    let folder = tmp_dir("token");
    // --host beyond loopback without a token: refused before anything starts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_marrow"))
        .args([
            "serve",
            folder.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .env_remove("MARROW_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));

    let token = "correct-horse-battery-staple";
    let server = Server::start(&[folder.to_str().unwrap(), "--token", token]);
    assert_eq!(server.get("/api/session").status, 401);
    let r = request(
        server.port,
        "GET",
        "/api/session",
        &[("Authorization", "Bearer wrong-token-wrong-token")],
        None,
    );
    assert_eq!(r.status, 401);
    let r = request(
        server.port,
        "GET",
        "/api/session",
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    );
    assert_eq!(r.status, 200);
    // Opening the printed address sets a cookie the page's later requests carry.
    let r = server.get(&format!("/?token={token}"));
    assert_eq!(r.status, 200);
    let cookie = r.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let c = cookie.split(';').next().unwrap();
    let r = request(server.port, "GET", "/api/session", &[("Cookie", c)], None);
    assert_eq!(r.status, 200);
    drop(server);
    serve_common::clean(&[&folder]);
}
