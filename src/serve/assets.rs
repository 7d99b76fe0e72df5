//! The single-page app, embedded in the binary at build time: plain HTML, CSS and JavaScript with
//! no build step, no CDN and no runtime downloads (a review station is often offline, and a page
//! that loads code from elsewhere could send patient images elsewhere).

/// `(content type, bytes)` of an asset by its URL path; `None` for anything else. The set is
/// fixed at compile time, so no request path ever reaches the file system.
pub fn get(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("web/index.html").as_slice(),
        ),
        "/app.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("web/app.js").as_slice(),
        ),
        "/app.css" => (
            "text/css; charset=utf-8",
            include_bytes!("web/app.css").as_slice(),
        ),
        "/favicon.svg" => (
            "image/svg+xml",
            include_bytes!("web/favicon.svg").as_slice(),
        ),
        _ => return None,
    })
}
