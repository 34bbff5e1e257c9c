//! The console in a real browser: headless Chromium (Debian's `chromium`)
//! driven through chromedriver (`chromium-driver`) with `fantoccini`,
//! against a real `retryq run` daemon delivering to the scripted test
//! upstream. Every check reads the page, as an operator would; the
//! upstream's log confirms what was delivered.
//!
//! Each test saves screenshots under `target/console-screenshots/`. Without
//! chromium or chromedriver the tests are skipped with a printed reason,
//! unless `RETRYQ_REQUIRE_SERVICES=1` (set by `.ci/run` after installing
//! them), where a missing browser is a failure.

#![cfg(unix)]

mod console_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use console_support::{Daemon, Mode, Upstream, TOKEN};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page may take to show what the daemon did.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// One browser at a time: two cores run a daemon and Chromium each.
static SERIAL: Mutex<()> = Mutex::new(());

/// The browser's binaries, or `None` (after printing why) when they are
/// missing and not required.
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "{} missing (apt-get install chromium chromium-driver)",
        missing.join(" and ")
    );
    assert!(
        std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "RETRYQ_REQUIRE_SERVICES=1 but {reason}"
    );
    eprintln!("skipping the console browser test: {reason}");
    false
}

fn screenshot_dir() -> PathBuf {
    // target/debug/deps/<test> -> target/console-screenshots
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the build's target folder")
        .to_path_buf();
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// chromedriver on a port of its own choosing, and a fresh Chromium profile.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        // Port 0, and the port read from its banner: a port picked here
        // and handed over could be taken before chromedriver binds it.
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let port = driver_port(&mut driver).await;
        let profile = tempfile::tempdir().expect("profile dir");
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1280,1600",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }))
        .expect("capabilities");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            match builder.capabilities(caps.clone()).connect(&url).await {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start a Chromium session: {e}"),
            }
        };
        Browser {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    fn page(&self) -> &Client {
        self.client.as_ref().expect("browser session")
    }

    async fn stop(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

/// The port in chromedriver's "ChromeDriver was started successfully on
/// port N." line; its stdout is drained afterwards so it never blocks.
async fn driver_port(driver: &mut Child) -> u16 {
    let stdout = driver.stdout.take().expect("chromedriver stdout");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let mut seen = Vec::new();
        let port = loop {
            let Some(line) = lines.next() else {
                break Err(format!("chromedriver said no port: {seen:?}"));
            };
            if line.contains("started successfully") {
                break line
                    .trim_end_matches('.')
                    .rsplit(' ')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| format!("no port in {line:?}"));
            }
            seen.push(line);
        };
        let _ = tx.send(port);
        lines.for_each(drop);
    });
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(port))) => port,
        Ok(Ok(Err(e))) => panic!("{e}"),
        Ok(Err(_)) => panic!("chromedriver's stdout reader stopped"),
        Err(_) => panic!("chromedriver did not say its port within 30 s"),
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The text of `css` once `ok` holds for it; panics with the last text and
/// a screenshot otherwise.
async fn wait_text(page: &Client, name: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PAGE_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(el) = page.find(Locator::Css(css)).await {
            if let Ok(text) = el.text().await {
                if ok(&text) {
                    return text;
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shot(page, &format!("{name}-timeout")).await;
    panic!("{css}: timed out; last text {last:?}");
}

async fn count(page: &Client, name: &str, css: &str, expected: u64) {
    wait_text(page, name, css, |t| t.trim() == expected.to_string()).await;
}

async fn displayed(page: &Client, css: &str) -> bool {
    match page.find(Locator::Css(css)).await {
        Ok(el) => el.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

/// Finds and clicks `css`. The page re-renders its tables from live events
/// and a periodic refresh, so an element found a moment ago may be gone
/// when clicked: a stale element is looked up again (a bounded number of
/// times), as a person would click the row they see now.
async fn click(page: &Client, css: &str) {
    let mut last = String::new();
    for _ in 0..20 {
        let element = match page.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match element.click().await {
            Ok(()) => return,
            Err(e) if e.to_string().contains("stale element") => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("click {css}: {e}"),
        }
    }
    panic!("click {css}: {last}");
}

async fn shot(page: &Client, name: &str) -> PathBuf {
    let path = screenshot_dir().join(format!("{name}.png"));
    match page.screenshot().await {
        Ok(png) => {
            if let Err(e) = std::fs::write(&path, png) {
                eprintln!("cannot save {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("no screenshot {name}: {e}"),
    }
    path
}

/// Types `token` into the login form and submits it.
async fn log_in(page: &Client, token: &str) {
    let input = page
        .find(Locator::Id("token"))
        .await
        .expect("the token field");
    input.clear().await.expect("clear the token field");
    input.send_keys(token).await.expect("type the token");
    click(page, "#login-submit").await;
}

/// An API call from the test (the operator's other tools), async.
async fn api(daemon: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client.request(method, daemon.url(path)).bearer_auth(TOKEN);
    if let Some(body) = body {
        req = req.body(body.to_owned());
    }
    let resp = req.send().await.expect("API call");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn enqueue(daemon: &Daemon, n: usize, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, body) = api(
            daemon,
            "POST",
            &format!("/v1/items{query}"),
            Some(&format!("{{\"finding\":{i},\"severity\":\"high\"}}")),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    ids
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn a_wrong_token_is_refused_and_logging_in_shows_the_counts() {
    if !browser_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let upstream = Upstream::start(Mode::Accept);
    let daemon = Daemon::start(&upstream, Some(TOKEN), "");
    runtime().block_on(async {
        // Hold delivery so the counts stay put while we look.
        assert_eq!(api(&daemon, "POST", "/v1/pause", None).await.0, 200);
        enqueue(&daemon, 3, "").await;
        let browser = Browser::start().await;
        let page = browser.page();
        page.goto(&daemon.url("/ui")).await.expect("open /ui");
        wait_text(page, "login", "#login-title", |t| t == "Log in").await;
        assert!(!displayed(page, "#app").await, "nothing shown before login");

        log_in(page, "this-is-not-the-token-000").await;
        let refused = wait_text(page, "wrong-token", "#login-error", |t| !t.is_empty()).await;
        assert!(refused.contains("refused"), "{refused}");
        assert!(
            !displayed(page, "#app").await,
            "a wrong token shows nothing"
        );
        shot(page, "wrong-token").await;
        // The token never reaches the URL.
        let url = page.current_url().await.expect("url");
        assert!(!url.as_str().contains("not-the-token"), "{url}");

        log_in(page, TOKEN).await;
        count(page, "login", "#count-pending", 3).await;
        count(page, "login", "#count-total", 3).await;
        count(page, "login", "#count-failed", 0).await;
        let paused = wait_text(page, "login", "#pause-state", |t| t.starts_with("paused")).await;
        assert!(paused.contains("paused by an operator"), "{paused}");
        wait_text(page, "login", "#plugins tbody td", |t| t == "pusher").await;
        wait_text(page, "login", "#live", |t| t == "live").await;
        let url = page.current_url().await.expect("url");
        assert!(!url.as_str().contains(TOKEN), "{url}");
        // Kept for this tab only: a reload stays logged in.
        page.refresh().await.expect("reload");
        count(page, "reload", "#count-pending", 3).await;
        shot(page, "logged-in").await;
        browser.stop().await;
    });
}

#[test]
fn the_counts_fall_as_items_are_delivered() {
    if !browser_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let upstream = Upstream::start(Mode::Delay(Duration::from_millis(150)));
    let daemon = Daemon::start(&upstream, Some(TOKEN), "concurrency = 1\nbatch_size = 2");
    runtime().block_on(async {
        assert_eq!(api(&daemon, "POST", "/v1/pause", None).await.0, 200);
        let ids = enqueue(&daemon, 12, "").await;
        let browser = Browser::start().await;
        let page = browser.page();
        page.goto(&daemon.url("/ui")).await.expect("open /ui");
        log_in(page, TOKEN).await;
        count(page, "drain-before", "#count-total", 12).await;
        wait_text(page, "drain-before", "#live", |t| t == "live").await;

        // Delivery resumes from elsewhere (the CLI, a script): the page
        // follows from the event stream, without a reload.
        assert_eq!(api(&daemon, "POST", "/v1/resume", None).await.0, 200);
        let mut seen = vec![12u64];
        let deadline = Instant::now() + PAGE_WAIT;
        while seen.last() != Some(&0) && Instant::now() < deadline {
            if let Ok(el) = page.find(Locator::Id("count-total")).await {
                if let Some(n) = el.text().await.ok().and_then(|t| t.trim().parse().ok()) {
                    if seen.last() != Some(&n) {
                        seen.push(n);
                        if n > 0 && n < 12 && seen.len() == 2 {
                            shot(page, "drain-during").await;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen.last(), Some(&0), "the page reached 0: {seen:?}");
        assert!(
            seen.windows(2).all(|w| w[1] < w[0]),
            "the counts only fell: {seen:?}"
        );
        assert!(
            seen.len() > 2,
            "the page showed the drain, not just its end: {seen:?}"
        );
        count(page, "drain-after", "#count-pending", 0).await;
        let chart = wait_text(page, "drain-after", "#chart-summary", |t| {
            t.contains("12 delivered")
        })
        .await;
        assert!(chart.starts_with("Last hour"), "{chart}");
        let activity = wait_text(page, "drain-after", "#events", |t| t.contains("delivered")).await;
        assert!(
            activity.contains(&ids[0]) || activity.contains(&ids[11]),
            "{activity}"
        );
        shot(page, "drain-after").await;
        browser.stop().await;
    });
    let delivered = upstream.accepted_per_key();
    assert_eq!(delivered.len(), 12, "{delivered:?}");
}

#[test]
fn a_dead_letter_retried_from_the_page_is_delivered_and_a_purge_asks_first() {
    if !browser_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 422: refused for good, so each item becomes a dead letter at once.
    let upstream = Upstream::start(Mode::Fail(422));
    let daemon = Daemon::start(&upstream, Some(TOKEN), "");
    runtime().block_on(async {
        let ids = enqueue(&daemon, 2, "?type=findings").await;
        let browser = Browser::start().await;
        let page = browser.page();
        page.goto(&daemon.url("/ui")).await.expect("open /ui");
        log_in(page, TOKEN).await;
        count(page, "dead-letters", "#count-failed", 2).await;
        upstream.set_mode(Mode::Accept);

        // Filter the table to dead letters, open one, look at it.
        page.find(Locator::Id("f-status"))
            .await
            .expect("status filter")
            .select_by_value("failed")
            .await
            .expect("choose failed");
        click(page, "#filters button[type=submit]").await;
        let row = format!("#item-table tr[data-id='{}']", ids[0]);
        wait_text(page, "dead-letters", &row, |t| t.contains("failed")).await;
        click(page, &format!("{row} button.link")).await;
        let meta = wait_text(page, "item-view", "#item-meta", |t| t.contains(&ids[0])).await;
        assert!(meta.contains("422"), "last_error shown: {meta}");
        let payload = wait_text(page, "item-view", "#item-payload", |t| !t.is_empty()).await;
        assert!(
            payload.contains("\"severity\": \"high\""),
            "pretty-printed: {payload}"
        );
        shot(page, "dead-letter").await;

        // Retry it from its row.
        click(page, &format!("{row} button[aria-label^='Retry']")).await;
        let said = wait_text(page, "retried", "#outcome", |t| t.contains("pending again")).await;
        assert!(said.contains(&ids[0]), "{said}");
        count(page, "retried", "#count-failed", 1).await;
        count(page, "retried", "#count-total", 1).await;
        shot(page, "retried").await;

        // Purge asks first; cancel keeps the dead letter.
        click(page, "#purge").await;
        wait_text(page, "purge", "#confirm-text", |t| {
            t.contains("Purge 1 dead letters")
        })
        .await;
        shot(page, "purge-confirm").await;
        click(page, "#confirm-cancel").await;
        wait_text(page, "purge", "#outcome", |t| t.contains("cancelled")).await;
        count(page, "purge", "#count-failed", 1).await;
        click(page, "#purge").await;
        wait_text(page, "purge", "#confirm-text", |t| !t.is_empty()).await;
        click(page, "#confirm-ok").await;
        wait_text(page, "purged", "#outcome", |t| {
            t.contains("1 dead letter purged")
        })
        .await;
        count(page, "purged", "#count-total", 0).await;
        shot(page, "purged").await;
        browser.stop().await;
    });
    let accepted = upstream.accepted_per_key();
    assert!(accepted.contains_key(&ids_first(&upstream)), "{accepted:?}");
    assert_eq!(
        accepted.len(),
        1,
        "only the retried item was delivered: {accepted:?}"
    );
}

/// The one item the upstream accepted.
fn ids_first(upstream: &Upstream) -> String {
    upstream
        .accepted_per_key()
        .keys()
        .next()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn pause_stops_delivery_and_resume_restarts_it_without_a_login() {
    if !browser_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let upstream = Upstream::start(Mode::Accept);
    // No token configured (loopback): the console opens without a login.
    let daemon = Daemon::start(&upstream, None, "");
    runtime().block_on(async {
        let browser = Browser::start().await;
        let page = browser.page();
        page.goto(&daemon.url("/ui")).await.expect("open /ui");
        count(page, "no-login", "#count-total", 0).await;
        assert!(!displayed(page, "#login").await, "no login without a token");
        assert!(!displayed(page, "#logout").await);
        wait_text(page, "no-login", "#pause-state", |t| t == "delivering").await;
        wait_text(page, "no-login", "#live", |t| t == "live").await;

        // By keyboard: type the reason, Tab to the Pause button, Enter.
        let reason = page
            .find(Locator::Id("pause-reason"))
            .await
            .expect("reason field");
        reason.click().await.expect("focus the reason field");
        reason
            .send_keys(&format!("browser test{}", char::from(Key::Tab)))
            .await
            .expect("type a reason and Tab on");
        let focused = page.active_element().await.expect("focused element");
        assert_eq!(
            focused.attr("id").await.expect("id").as_deref(),
            Some("pause"),
            "Tab from the reason reaches Pause"
        );
        focused
            .send_keys(&char::from(Key::Enter).to_string())
            .await
            .expect("press Enter");
        wait_text(page, "paused", "#outcome", |t| {
            t.contains("Delivery paused: browser test")
        })
        .await;
        wait_text(page, "paused", "#pause-state", |t| {
            t.starts_with("paused: browser test at")
        })
        .await;
        wait_text(page, "paused", "#events", |t| t.contains("delivery paused")).await;

        enqueue(&daemon, 4, "").await;
        count(page, "paused", "#count-pending", 4).await;
        // Paused: a few delivery intervals pass and nothing goes out.
        tokio::time::sleep(Duration::from_secs(2)).await;
        count(page, "paused", "#count-pending", 4).await;
        assert_eq!(upstream.request_count(), 0, "nothing pushed while paused");
        shot(page, "paused").await;

        click(page, "#resume").await;
        wait_text(page, "resumed", "#outcome", |t| {
            t.contains("Delivery resumed")
        })
        .await;
        count(page, "resumed", "#count-total", 0).await;
        wait_text(page, "resumed", "#pause-state", |t| t == "delivering").await;
        shot(page, "resumed").await;

        // Process now answers with its outcome too.
        click(page, "#process-now").await;
        wait_text(page, "process-now", "#outcome", |t| {
            t.contains("Delivery round")
        })
        .await;
        browser.stop().await;
    });
    assert_eq!(upstream.accepted_per_key().len(), 4);
}

#[test]
fn the_overview_and_the_last_failed_call_stay_visible() {
    if !browser_available() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let upstream = Upstream::start(Mode::Accept);
    let daemon = Daemon::start(&upstream, Some(TOKEN), "max_attempts = 3");
    runtime().block_on(async {
        // Some history: deliveries, then an outage that leaves dead letters
        // and items waiting for their next retry.
        enqueue(&daemon, 8, "?type=findings").await;
        let deadline = Instant::now() + PAGE_WAIT;
        while upstream.accepted_per_key().len() < 8 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        upstream.set_mode(Mode::Fail(503));
        enqueue(&daemon, 3, "?type=assets&max_attempts=1").await;
        enqueue(&daemon, 2, "?type=findings").await;
        let browser = Browser::start().await;
        let page = browser.page();
        page.goto(&daemon.url("/ui")).await.expect("open /ui");
        log_in(page, TOKEN).await;
        count(page, "overview", "#count-failed", 3).await;
        wait_text(page, "overview", "#chart-summary", |t| t.contains("8 delivered")).await;
        wait_text(page, "overview", "#oldest", |t| t.contains("old (")).await;
        wait_text(page, "overview", "#bytes-text", |t| t.contains("of 100.0 MiB")).await;
        // The README's screenshot.
        shot(page, "overview").await;
        // At 200% zoom a 1280 px window lays out like a 640 px one: the page
        // reflows instead of scrolling sideways (wide tables scroll in
        // their own box).
        page.set_window_size(640, 1400).await.expect("narrow window");
        let overflow = page
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
                vec![],
            )
            .await
            .expect("measure");
        assert!(
            overflow.as_i64().is_some_and(|px| px <= 1),
            "no sideways scrolling at 640 px: {overflow}"
        );
        shot(page, "overview-640px").await;
        page.set_window_size(1280, 1600).await.expect("wide window");

        // A call the daemon refuses: a pause reason over 500 characters.
        let reason = "x".repeat(501);
        page.find(Locator::Id("pause-reason"))
            .await
            .expect("reason field")
            .send_keys(&reason)
            .await
            .expect("type");
        // maxlength keeps the field at 500: lift it to send the long one.
        page.execute(
            "const f = document.getElementById('pause-reason'); f.removeAttribute('maxlength'); f.value = arguments[0]; return true;",
            vec![json!(reason)],
        )
        .await
        .expect("script");
        click(page, "#pause").await;
        let error = wait_text(page, "failed-call", "#last-error", |t| t.contains("400")).await;
        assert!(error.contains("POST /v1/pause"), "{error}");
        assert!(error.contains("longer than 500"), "{error}");
        // Refused, so not paused (the outage holds delivery at the circuit).
        wait_text(page, "failed-call", "#pause-state", |t| {
            t.starts_with("waiting: the circuit is open")
        })
        .await;
        // A later success does not hide it.
        click(page, "#process-now").await;
        wait_text(page, "failed-call", "#outcome", |t| t.contains("Delivery round")).await;
        assert!(displayed(page, "#last-error").await, "the last failure stays visible");
        shot(page, "last-failed-call").await;
        browser.stop().await;
    });
}
