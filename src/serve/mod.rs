//! `marrow serve`: the review workstation. A local web server with an embedded single-page app in
//! which a pathologist checks, corrects, tallies and signs off the model's counts.
//!
//! * [`case`]: a case folder, its state rebuilt from the model output and the audit log;
//! * [`audit`]: the append-only, fsynced JSONL log;
//! * [`worker`]: the one thread that owns the GPU and counts queued images;
//! * [`assets`]: the page, compiled into the binary.
//!
//! Why axum + tokio: axum is the tokio project's own router on hyper, the most used and best
//! maintained Rust HTTP stack; it gives typed extractors (a malformed request is refused before a
//! handler runs), body limits, and middleware for the security checks below, without macros or
//! code generation. The server is small and local, so its async side stays thin: every file or
//! fsync operation runs on tokio's blocking pool, GPU work on the worker thread.
//!
//! Security (see docs/review-workstation.md): binds 127.0.0.1 unless `--host`, which needs
//! `--token`; the token is compared in constant time; without a token the `Host` header must
//! name the loopback address (DNS rebinding); mutating requests must come from the page's own
//! origin (`Origin`, when the browser sends one) with a JSON body (CSRF); no request carries a
//! file path: images are addressed by case and index, and files are re-checked to be inside the
//! case's folders before they are read.

pub mod assets;
pub mod audit;
pub mod case;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::count::document::NOTICE;
use crate::count::report::class_colour;
use crate::count::{CountOptions, Model, ModelInfo};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use case::{Case, EditError, EditRequest};
use worker::{lock, Cases, Job, QueueState};

/// Default upload cap per image (bytes).
pub const DEFAULT_MAX_UPLOAD: usize = 64 << 20;

/// What `marrow serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Image folders, one case each.
    pub folders: Vec<PathBuf>,
    /// The case folder (only with at most one image folder); default `<FOLDER>/.marrow-case`.
    pub case_dir: Option<PathBuf>,
    pub host: IpAddr,
    /// 0 = any free port (tests).
    pub port: u16,
    pub token: Option<String>,
    pub max_upload: usize,
    /// The default tally target (cells); the page can change it.
    pub target: Option<usize>,
    pub count: CountOptions,
    pub gpu: GpuOptions,
}

struct App {
    cases: Cases,
    queue: Arc<Mutex<QueueState>>,
    jobs: Mutex<mpsc::Sender<Job>>,
    model: ModelInfo,
    threshold: f32,
    target: Option<usize>,
    max_upload: usize,
    token: Option<String>,
    port: u16,
}

type Shared = Arc<App>;

/// A JSON error answer: `{"error": "…"}` with a status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::Bad(m) => ApiError(StatusCode::BAD_REQUEST, m),
            EditError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            EditError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            EditError::Io(e) => ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the change could not be saved, so it was not made: {e}"),
            ),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Runs blocking work (file I/O, fsync, case locks) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

fn is_loopback(ip: &IpAddr) -> bool {
    ip.is_loopback()
}

/// Constant-time equality of two secrets (no early exit on the first differing byte, so the
/// answer time does not leak how much of a guess was right).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

/// Opens the cases of `cfg` (creating case folders, replaying their logs).
pub fn open_cases(cfg: &ServeConfig, model: &ModelInfo) -> Result<Vec<Case>> {
    if cfg.case_dir.is_some() && cfg.folders.len() > 1 {
        return Err(Error::Invalid(
            "--case names one case folder: give at most one image folder with it".into(),
        ));
    }
    let threshold = cfg.count.threshold;
    if cfg.folders.is_empty() {
        let dir = cfg
            .case_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("marrow-case"));
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "uploads".into());
        return Ok(vec![Case::open(name, None, &dir, model, threshold)?]);
    }
    let mut cases = Vec::new();
    for f in &cfg.folders {
        if !f.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: not a folder (marrow serve opens folders of fields)",
                f.display()
            )));
        }
        let dir = cfg
            .case_dir
            .clone()
            .unwrap_or_else(|| f.join(case::DEFAULT_CASE_DIR));
        let name = f
            .canonicalize()
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| f.display().to_string());
        cases.push(Case::open(name, Some(f), &dir, model, threshold)?);
    }
    Ok(cases)
}

/// Runs the server until Ctrl-C (or SIGTERM). Prints the address it listens on.
pub fn run(cfg: ServeConfig, model: Model) -> Result<()> {
    if !is_loopback(&cfg.host) && cfg.token.is_none() {
        return Err(Error::Invalid(format!(
            "--host {} exposes patient images to the network: it needs --token SECRET \
             (or MARROW_TOKEN)",
            cfg.host
        )));
    }
    if cfg.token.as_deref().is_some_and(|t| t.len() < 16) {
        return Err(Error::Invalid(
            "--token must be at least 16 characters (a guessable token protects nothing)".into(),
        ));
    }
    let info = model.info.clone();
    let cases: Cases = Arc::new(
        open_cases(&cfg, &info)?
            .into_iter()
            .map(|c| Arc::new(Mutex::new(c)))
            .collect(),
    );
    let queue = Arc::new(Mutex::new(QueueState::default()));
    let jobs = worker::spawn(
        model,
        cfg.count.clone(),
        cfg.gpu.clone(),
        cases.clone(),
        queue.clone(),
    )?;
    for (ci, c) in cases.iter().enumerate() {
        let c = lock(c);
        for n in &c.notes {
            eprintln!("marrow serve: case {}: {n}", c.name);
        }
        for r in &c.refused {
            eprintln!("marrow serve: case {}: refused {r}", c.name);
        }
        for i in c.uncounted() {
            enqueue(&jobs, &queue, ci, i, c.images[i].path.clone());
        }
        eprintln!(
            "marrow serve: case {} ({} images, {} to count) in {}",
            c.name,
            c.images.len(),
            c.uncounted().len(),
            c.dir.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(cfg.host, cfg.port))
            .await
            .map_err(|e| {
                Error::Invalid(format!(
                    "cannot listen on {}:{}: {e}{}",
                    cfg.host,
                    cfg.port,
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (another marrow serve? pass --port)"
                    } else {
                        ""
                    }
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Invalid(format!("listener address: {e}")))?;
        let app = Arc::new(App {
            cases,
            queue,
            jobs: Mutex::new(jobs),
            threshold: cfg.count.threshold,
            model: info,
            target: cfg.target,
            max_upload: cfg.max_upload,
            token: cfg.token.clone(),
            port: addr.port(),
        });
        if !is_loopback(&cfg.host) {
            eprintln!(
                "WARNING: marrow serve is reachable from the network on {addr}. Anyone with the \
                 token can read these images and change the counts; use it only on a network \
                 you trust, and prefer an SSH tunnel to 127.0.0.1."
            );
        }
        let shown = if cfg.host.is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        let shown = if shown.contains("::") || matches!(cfg.host, IpAddr::V6(_)) {
            format!("[{}]:{}", addr.ip(), addr.port())
        } else {
            shown
        };
        match &cfg.token {
            Some(_) => println!("marrow serve: review at http://{shown}/?token=<your token>"),
            None => println!("marrow serve: review at http://{shown}/"),
        }
        println!("{NOTICE}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::Invalid(format!("server error: {e}")))
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn enqueue(
    jobs: &mpsc::Sender<Job>,
    queue: &Mutex<QueueState>,
    case: usize,
    image: usize,
    path: PathBuf,
) {
    queue.lock().unwrap_or_else(|p| p.into_inner()).submitted += 1;
    let _ = jobs.send(Job { case, image, path });
}

fn router(app: Shared) -> Router {
    let max_upload = app.max_upload;
    Router::new()
        .route("/", get(asset))
        .route("/index.html", get(asset))
        .route("/app.js", get(asset))
        .route("/app.css", get(asset))
        .route("/favicon.svg", get(asset))
        .route("/api/session", get(session))
        .route("/api/cases/{c}", get(case_view))
        .route("/api/cases/{c}/images/{i}", get(image_view))
        .route("/api/cases/{c}/images/{i}/file", get(image_file))
        .route("/api/cases/{c}/images/{i}/edit", post(edit))
        .route(
            "/api/cases/{c}/upload",
            post(upload).layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/api/cases/{c}/signoff", post(signoff))
        .route("/api/cases/{c}/reopen", post(reopen))
        .route("/api/cases/{c}/export", post(export))
        .route("/api/cases/{c}/exports/{name}", get(export_file))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(1 << 20))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such page or resource".into())
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix("marrow_token="))
        .map(str::to_string)
        .next()
}

/// The checks every request passes before a handler sees it (see the module documentation).
async fn guard(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut set_cookie = None;
    match &app.token {
        None => {
            let p = app.port;
            // The name must be a loopback one; any port, so that an SSH tunnel
            // (`ssh -L 9000:127.0.0.1:8600`) works. A rebinding attack names its own host.
            let name = match host.rsplit_once(':') {
                Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => host.as_str(),
            };
            if !["127.0.0.1", "localhost", "[::1]"].contains(&name) {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                        "refused: Host {host:?} is not this server's loopback address (open \
                         http://127.0.0.1:{p}/)"
                    ),
                )
                .into_response();
            }
        }
        Some(token) => {
            let query_token = req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.strip_prefix("token="))
                    .map(str::to_string)
                    .next()
            });
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let given = bearer
                .or_else(|| cookie_token(headers))
                .or(query_token.clone());
            if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
                return ApiError(
                    StatusCode::UNAUTHORIZED,
                    "a token is needed: open the address printed by marrow serve, with \
                     ?token=…"
                        .into(),
                )
                .into_response();
            }
            if query_token.is_some() {
                set_cookie = Some(format!(
                    "marrow_token={token}; HttpOnly; SameSite=Strict; Path=/"
                ));
            }
        }
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        // Browsers send Origin on every cross-site and same-site POST; a page of another site
        // posting here (CSRF) names its own origin.
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            if origin.to_ascii_lowercase() != format!("http://{host}") {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    format!("refused: a change requested by another site ({origin})"),
                )
                .into_response();
            }
        }
    }
    let is_api = req.uri().path().starts_with("/api/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
             script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    if is_api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    resp
}

async fn asset(req: Request) -> Response {
    match assets::get(req.uri().path()) {
        Some((mime, bytes)) => ([(header::CONTENT_TYPE, mime)], bytes).into_response(),
        None => not_found().await.into_response(),
    }
}

fn case_of(app: &App, c: usize) -> ApiResult<Arc<Mutex<Case>>> {
    app.cases
        .get(c)
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no case {c}")))
}

async fn session(State(app): State<Shared>) -> Json<Value> {
    let classes: Vec<Value> = app
        .model
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"label": i + 1, "name": c, "colour": class_colour(i + 1)}))
        .collect();
    let cases: Vec<Value> = app
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": i, "name": lock(c).name}))
        .collect();
    let queue = app.queue.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "notice": NOTICE,
        "model": {"file": app.model.file, "sha256": app.model.sha256},
        "classes": classes,
        "me_ratio_defined": app.model.lineage.is_some(),
        // As typed (0.7), not as the f32 it is stored in (0.699999988…).
        "threshold": (f64::from(app.threshold) * 1e6).round() / 1e6,
        "near_fraction": crate::count::annotate::NEAR_FRACTION,
        "target": app.target,
        "max_upload": app.max_upload,
        "cases": cases,
        "queue": queue,
    }))
}

#[derive(Deserialize)]
struct TargetQuery {
    target: Option<usize>,
}

async fn case_view(
    State(app): State<Shared>,
    UrlPath(c): UrlPath<usize>,
    Query(q): Query<TargetQuery>,
) -> ApiResult<Json<Value>> {
    let case = case_of(&app, c)?;
    let target = q.target.or(app.target);
    let queue = app.queue.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut v = lock(&case).case_view(c, target);
    v["queue"] = json!(queue);
    Ok(Json(v))
}

async fn image_view(
    State(app): State<Shared>,
    UrlPath((c, i)): UrlPath<(usize, usize)>,
) -> ApiResult<Json<Value>> {
    let case = case_of(&app, c)?;
    let v = lock(&case)
        .image_view(i)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no image {i} in case {c}")))?;
    Ok(Json(v))
}

/// The image's bytes for the browser: JPEG, PNG and BMP as they are on disk; other formats
/// (TIFF) decoded and sent as PNG, since browsers cannot show them.
async fn image_file(
    State(app): State<Shared>,
    UrlPath((c, i)): UrlPath<(usize, usize)>,
) -> ApiResult<Response> {
    let case = case_of(&app, c)?;
    let (path, roots) = {
        let c = lock(&case);
        let im = c
            .images
            .get(i)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no image {i}")))?;
        let roots: Vec<PathBuf> = c.root.iter().cloned().chain([c.dir.clone()]).collect();
        (im.path.clone(), roots)
    };
    blocking(move || {
        // Checked again now: a link swapped in after start must not lead outside the case.
        if !roots.iter().any(|r| case::inside(&path, r)) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "refused: the file is outside the case's folders".into(),
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "{}: {e}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            )
        })?;
        let mime = if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            "image/jpeg"
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            "image/png"
        } else if bytes.starts_with(b"BM") {
            "image/bmp"
        } else {
            let img = crate::image_io::decode_rgb8(&bytes, &path)
                .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
            let mut png = Vec::new();
            image::ImageEncoder::write_image(
                image::codecs::png::PngEncoder::new(&mut png),
                &img.data,
                img.width,
                img.height,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(internal)?;
            return Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response());
        };
        Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
    })
    .await
}

fn json_body<T>(body: std::result::Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(v)| v).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {}", e.body_text()),
        )
    })
}

async fn edit(
    State(app): State<Shared>,
    UrlPath((c, i)): UrlPath<(usize, usize)>,
    body: std::result::Result<Json<EditRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let req = json_body(body)?;
    let case = case_of(&app, c)?;
    blocking(move || {
        let mut c = lock(&case);
        let cell = c.edit(i, &req)?;
        let mut v = c.image_view(i).unwrap_or(Value::Null);
        v["edited"] = json!(cell);
        v["audit_events"] = json!(c.audit_events());
        Ok(Json(v))
    })
    .await
}

#[derive(Deserialize)]
struct UploadQuery {
    name: Option<String>,
    reviewer: Option<String>,
}

async fn upload(
    State(app): State<Shared>,
    UrlPath(c): UrlPath<usize>,
    Query(q): Query<UploadQuery>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let name = q.name.unwrap_or_else(|| "upload".into());
    let limit_mib = app.max_upload as f64 / (1 << 20) as f64;
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{name}: the file is larger than the upload limit of {limit_mib:.0} MiB \
                     (marrow serve --max-upload-mb)"
                ),
            )
        } else {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("{name}: {}", e.body_text()),
            )
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{name}: the file is empty"),
        ));
    }
    let case = case_of(&app, c)?;
    let reviewer = q.reviewer.unwrap_or_default();
    let app2 = app.clone();
    blocking(move || {
        // Decoded in full before anything is stored: a file that is not an image, is too large
        // or is a decompression bomb is refused here with the decoder's reason.
        crate::image_io::decode_rgb8(&bytes, Path::new(&name)).map_err(|e| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{e}. Nothing was added to the case."),
            )
        })?;
        let sha = crate::count::sha256_hex(&bytes);
        let file_name = format!("{}-{}", &sha[..12], case::safe_file_name(&name));
        let mut c = lock(&case);
        let key = format!("{}/{file_name}", case::UPLOADS);
        // The same bytes under any name are the same field: counted once.
        let same = format!("{}/{}-", case::UPLOADS, &sha[..12]);
        if let Some(i) = c.images.iter().position(|im| im.key.starts_with(&same)) {
            let key = c.images[i].key.clone();
            return Ok(Json(json!({"index": i, "key": key, "duplicate": true})));
        }
        let path = c.dir.join(&key);
        audit::write_atomic(&path, &bytes).map_err(internal)?;
        let who = if reviewer.trim().is_empty() {
            "unnamed"
        } else {
            reviewer.trim()
        };
        let i = c
            .add_upload(&file_name, &name, &sha, who)
            .map_err(internal)?;
        enqueue(
            &app2.jobs.lock().unwrap_or_else(|p| p.into_inner()),
            &app2.queue,
            app2.cases
                .iter()
                .position(|x| Arc::ptr_eq(x, &case))
                .unwrap_or(0),
            i,
            path,
        );
        Ok(Json(json!({"index": i, "key": key, "duplicate": false})))
    })
    .await
}

#[derive(Deserialize)]
struct SignBody {
    #[serde(default)]
    reviewer: String,
}

async fn signoff(
    State(app): State<Shared>,
    UrlPath(c): UrlPath<usize>,
    body: std::result::Result<Json<SignBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let b = json_body(body)?;
    let reviewer = b.reviewer.trim().to_string();
    if reviewer.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a sign-off needs the reviewer's name".into(),
        ));
    }
    let case = case_of(&app, c)?;
    let target = app.target;
    blocking(move || {
        let mut cs = lock(&case);
        cs.sign(Some(&reviewer))?;
        Ok(Json(cs.case_view(c, target)))
    })
    .await
}

async fn reopen(
    State(app): State<Shared>,
    UrlPath(c): UrlPath<usize>,
    body: std::result::Result<Json<SignBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let _ = json_body(body)?;
    let case = case_of(&app, c)?;
    let target = app.target;
    blocking(move || {
        let mut cs = lock(&case);
        cs.sign(None)?;
        Ok(Json(cs.case_view(c, target)))
    })
    .await
}

#[derive(Deserialize)]
struct ExportBody {
    format: String,
    #[serde(default)]
    target: Option<usize>,
}

/// The export files a browser may download, by name (never a path).
const DOWNLOADS: [&str; 3] = [
    "reviewed-report.json",
    "reviewed-report.csv",
    "coco-ground-truth.json",
];

async fn export(
    State(app): State<Shared>,
    UrlPath(c): UrlPath<usize>,
    body: std::result::Result<Json<ExportBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let b = json_body(body)?;
    let case = case_of(&app, c)?;
    let target = b.target.or(app.target);
    blocking(move || {
        let cs = lock(&case);
        let files = cs
            .export(&b.format, target)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        let download = files
            .iter()
            .filter_map(|f| f.strip_prefix("exports/"))
            .find(|f| DOWNLOADS.contains(f))
            .map(|f| format!("/api/cases/{c}/exports/{f}"));
        Ok(Json(json!({
            "files": files,
            "folder": cs.dir.join(case::EXPORTS).display().to_string(),
            "download": download,
        })))
    })
    .await
}

async fn export_file(
    State(app): State<Shared>,
    UrlPath((c, name)): UrlPath<(usize, String)>,
) -> ApiResult<Response> {
    if !DOWNLOADS.contains(&name.as_str()) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no export named {name:?}"),
        ));
    }
    let case = case_of(&app, c)?;
    let dir = lock(&case).dir.join(case::EXPORTS);
    blocking(move || {
        let bytes = std::fs::read(dir.join(&name)).map_err(|_| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("{name} has not been exported yet"),
            )
        })?;
        let mime = if name.ends_with(".csv") {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        };
        Ok((
            [
                (header::CONTENT_TYPE, mime.to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}\""),
                ),
            ],
            Body::from(bytes),
        )
            .into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(same_secret(b"abcdefgh", b"abcdefgh"));
        assert!(!same_secret(b"abcdefgh", b"abcdefgi"));
        assert!(!same_secret(b"abcdefgh", b"abcdefg"));
        assert!(!same_secret(b"", b"a"));
        assert!(same_secret(b"", b""));
    }
}
