//! Crash safety of `marrow serve`: a burst of edits, the server SIGKILLed in the middle of it,
//! a torn line appended to the log as a crash mid-write would leave it, a restart — and every
//! edit the server acknowledged (a 2xx answer) is there.

mod serve_common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::{case_dir, example_folder, try_request, Server};

/// One acknowledged edit and what it must have left behind.
#[derive(Debug, Clone)]
enum Acked {
    /// A drawn cell with this id and box.
    Added(String, [f64; 4]),
    /// A model cell reclassified to this label.
    Relabelled(String, u64),
    Deleted(String),
}

fn post(port: u16, body: &Value) -> std::io::Result<(u16, Value)> {
    let r = try_request(
        port,
        "POST",
        "/api/cases/0/images/0/edit",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )?;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    Ok((r.status, v))
}

#[test]
fn acknowledged_edits_survive_sigkill() {
    let folder = example_folder("crash", 1);
    let args = [folder.to_str().unwrap()];
    let mut server = Server::start(&args);
    server.wait_counted(600);
    let view = server.get_json("/api/cases/0/images/0");
    // (id, label) of the model's cells.
    let model_cells: Vec<(String, u64)> = view["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["label"].as_u64().unwrap(),
            )
        })
        .collect();
    let (w, h) = (
        view["width"].as_f64().unwrap(),
        view["height"].as_f64().unwrap(),
    );

    let port = server.port;
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let burst = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            // Edits as fast as the server acknowledges them, from one client (the page's way):
            // drawn cells at distinct places, and each model cell relabelled or deleted once.
            for n in 0usize.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let k = n / 3;
                let (body, expect) = if n % 3 == 1 && k < model_cells.len() {
                    let (id, old_label) = model_cells[k].clone();
                    if k % 2 == 0 {
                        (
                            json!({"op": "delete", "cell": id, "reviewer": "burst"}),
                            Acked::Deleted(id),
                        )
                    } else {
                        // Always a real change (an edit to the same class is not logged).
                        let label = old_label % 3 + 1;
                        (
                            json!({"op": "reclassify", "cell": id, "label": label, "reviewer": "burst"}),
                            Acked::Relabelled(id, label),
                        )
                    }
                } else {
                    let x = (n * 7) as f64 % (w - 20.0);
                    let y = ((n * 13) as f64 / 3.0).floor() % (h - 20.0);
                    let b = [x, y, x + 12.0, y + 10.0];
                    (
                        json!({"op": "add", "bbox": b, "label": 2, "reviewer": "burst"}),
                        Acked::Added(String::new(), b),
                    )
                };
                match post(port, &body) {
                    Ok((200, v)) => {
                        let e = match expect {
                            Acked::Added(_, b) => {
                                Acked::Added(v["edited"].as_str().unwrap().to_string(), b)
                            }
                            e => e,
                        };
                        acked.lock().unwrap().push(e);
                    }
                    Ok((status, v)) => panic!("edit {body} refused: {status} {v}"),
                    // The server was killed: the edit in flight was never acknowledged.
                    Err(_) => return,
                }
            }
        })
    };
    // Let the burst run, then kill the server in the middle of it.
    let t = Instant::now();
    while acked.lock().unwrap().len() < 40 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    server.kill();
    stop.store(true, Ordering::Relaxed);
    burst.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 40,
        "only {} edits before the kill",
        acked.len()
    );

    // What a crash in the middle of a write leaves: a torn last line.
    let log = case_dir(&folder).join("audit.jsonl");
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines_before >= acked.len());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(br#"{"seq":99999,"time":"2026-"#)
        .unwrap();

    let server = Server::start(&args);
    assert!(
        server.stderr().contains("torn line"),
        "the cut-off line is reported: {}",
        server.stderr()
    );
    let view = server.get_json("/api/cases/0/images/0");
    let cells = view["cells"].as_array().unwrap();
    let find = |id: &str| cells.iter().find(|c| c["id"] == id);
    for e in &acked {
        match e {
            Acked::Added(id, b) => {
                let c = find(id).unwrap_or_else(|| panic!("acknowledged {e:?} lost"));
                for (got, want) in c["bbox"].as_array().unwrap().iter().zip(b) {
                    assert!((got.as_f64().unwrap() - want).abs() < 1e-3, "{e:?}: {c}");
                }
                assert_eq!(c["deleted"], false);
            }
            Acked::Relabelled(id, label) => {
                assert_eq!(find(id).unwrap()["label"], *label, "{e:?}")
            }
            Acked::Deleted(id) => assert_eq!(find(id).unwrap()["deleted"], true, "{e:?}"),
        }
    }
    // The restarted server goes on logging after the cut.
    let r = post(
        server.port,
        &json!({"op": "add", "bbox": [1, 1, 30, 30], "label": 1, "reviewer": "after"}),
    )
    .unwrap();
    assert_eq!(r.0, 200, "{}", r.1);
    let text = std::fs::read_to_string(&log).unwrap();
    for l in text.lines() {
        serde_json::from_str::<Value>(l).expect("every line of the log is whole");
    }
    eprintln!(
        "{} edits acknowledged before SIGKILL; {} lines in the log",
        acked.len(),
        text.lines().count()
    );
    drop(server);
    serve_common::clean(&[folder.parent().unwrap()]);
}
