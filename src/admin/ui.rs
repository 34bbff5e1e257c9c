//! The operator console's static assets (`/ui`): one HTML page, one
//! script and one style sheet, embedded in the binary with `include_str!`,
//! so the console needs no second server, no CDN and no internet, and a
//! fresh clone's `cargo build` serves it (there is no build step).
//!
//! The assets carry no secret and are served without the token; everything
//! the page shows comes from the API, called with the token the operator
//! typed (kept in `sessionStorage`, sent only in the `Authorization`
//! header). A strict Content-Security-Policy allows only these files and
//! same-origin API calls, and forbids framing.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Only our own files and same-origin calls; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Registers `/ui`, `/ui/` and the assets.
pub(super) fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/ui").route(web::get().to(index)))
        .service(web::resource("/ui/").route(web::get().to(index)))
        .service(web::resource("/ui/app.js").route(web::get().to(app_js)))
        .service(web::resource("/ui/app.css").route(web::get().to(app_css)));
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        // Embedded in the binary: a new build may change them.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> HttpResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}
