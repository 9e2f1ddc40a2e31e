//! The client's side, on the person's machine: the browser login on a
//! loopback redirect (RFC 8252), and showing a device-flow prompt.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use openidconnect::url::{Host, Url};
use openidconnect::PkceCodeChallenge;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::claims::quote;
use super::config::{check_loopback_redirect, is_loopback_host};
use super::verifier::random_token;
use super::{CodeGrant, DevicePrompt, LoginChallenge, OidcError, SecretString};
use postern_identity::credential::format_timestamp;

/// How long [`browser_login`] waits for the browser by default.
pub const LOGIN_PAGE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Connections the loopback listener serves at once (browsers open a few
/// speculative ones).
const MAX_CONNECTIONS: usize = 8;
/// Longest request head read from the browser.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// How long one connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest authorization code accepted.
const MAX_CODE_LEN: usize = 4096;

/// Runs the person's part of a browser login: listens on the challenge's
/// loopback redirect URI (a random port unless it names one), builds the
/// authorization URL with a PKCE S256 challenge, a random `state` and the
/// authority's nonce, hands it to `present` (print it and open a browser:
/// [`show_login_url`]; tests drive the provider with it), and waits up to
/// `timeout` for the provider to redirect the browser back.
///
/// Only a redirect carrying the `state` sent counts: any other request to
/// the listener (another path such as `/favicon.ico`, a wrong or missing
/// `state`, a repeated parameter) is answered with a short page saying it
/// was ignored, and the wait goes on until the real redirect or the
/// timeout, so that a stray request from another local process cannot end
/// the login. The redirect must then name the challenge's issuer if it
/// names one (RFC 9207). The browser gets a short page saying whether to go
/// back to the terminal. Cancel-safe: dropping the future closes the
/// listener.
pub async fn browser_login<F>(
    challenge: &LoginChallenge,
    timeout: Duration,
    present: F,
) -> Result<CodeGrant, OidcError>
where
    F: FnOnce(&str),
{
    let bad = |m: String| OidcError::BadChallenge(m);
    let mut auth_url = Url::parse(&challenge.authorization_endpoint)
        .map_err(|e| bad(format!("authorization endpoint is not a URL: {e}")))?;
    if !(auth_url.scheme() == "https"
        || (auth_url.scheme() == "http" && is_loopback_host(&auth_url)))
    {
        return Err(bad(format!(
            "authorization endpoint {} must use https",
            quote(auth_url.as_str())
        )));
    }
    let mut redirect = Url::parse(&challenge.redirect_uri)
        .map_err(|e| bad(format!("redirect URI is not a URL: {e}")))?;
    check_loopback_redirect(&redirect).map_err(|e| bad(e.to_string()))?;
    let ip: IpAddr = match redirect.host() {
        Some(Host::Ipv4(ip)) => ip.into(),
        Some(Host::Ipv6(ip)) => ip.into(),
        _ => return Err(bad("redirect URI host is not a loopback address".into())),
    };
    let addr = SocketAddr::new(ip, redirect.port().unwrap_or(0));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| OidcError::Loopback {
            addr: addr.to_string(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| OidcError::Loopback {
            addr: addr.to_string(),
            source,
        })?
        .port();
    redirect
        .set_port(Some(port))
        .map_err(|()| bad("cannot set the port of the redirect URI".into()))?;

    let (pkce_challenge, pkce_verifier) = PkceCodeChallenge::new_random_sha256();
    let state = random_token();
    {
        let mut q = auth_url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &challenge.client_id)
            .append_pair("redirect_uri", redirect.as_str())
            .append_pair("scope", &challenge.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &challenge.nonce)
            .append_pair("code_challenge", pkce_challenge.as_str())
            .append_pair("code_challenge_method", "S256");
        for (k, v) in &challenge.extra_params {
            q.append_pair(k, v);
        }
    }
    present(auth_url.as_str());

    let expected = Expected {
        path: redirect.path().to_string(),
        state,
        issuer: challenge.issuer.clone(),
    };
    let code = wait_for_redirect(listener, Arc::new(expected), timeout).await?;
    Ok(CodeGrant {
        nonce: challenge.nonce.clone(),
        code,
        pkce_verifier: SecretString::new(pkce_verifier.secret().clone()),
        redirect_uri: redirect.to_string(),
    })
}

/// Prints the login URL on standard error and, if asked, opens it with the
/// desktop's browser (`xdg-open`, or `open` on macOS). Failing to start a
/// browser is reported, not fatal: the URL is printed anyway.
pub fn show_login_url(url: &str, open_browser: bool) {
    eprintln!("To log in, open this address in a browser on this machine:\n\n    {url}\n");
    if !open_browser {
        return;
    }
    let mut command = browser_command(url);
    let opener = command.get_program().to_string_lossy().into_owned();
    match command.spawn() {
        Ok(mut child) => {
            // Reap it whenever it exits, without blocking the login.
            std::thread::spawn(move || child.wait());
        }
        Err(e) => eprintln!(
            "(could not start {opener} to open a browser: {e}; open the address yourself)"
        ),
    }
}

/// The command that opens `url` in the desktop's browser: `xdg-open` (or
/// `open` on macOS), with no standard input or output, and without the
/// secret variables of [`postern_identity::secret_env`] in its environment
/// (the browser and everything it starts inherit it).
fn browser_command(url: &str) -> std::process::Command {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let mut command = std::process::Command::new(opener);
    command
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    postern_identity::secret_env::scrub_child(&mut command);
    command
}

/// Prints a device-flow prompt on standard error, headed by the identity
/// being enrolled and a warning: whoever enters the code enrolls that
/// identity with their own attributes.
pub fn show_device_prompt(prompt: &DevicePrompt) {
    if let Some(who) = &prompt.enrolling {
        eprintln!(
            "You are enrolling {who}.\nEnter the code below only if you started this enrollment yourself, on this machine: whoever enters it gives {who} their access.\n"
        );
    }
    eprintln!(
        "To log in, open {} in a browser on any device and enter the code\n\n    {}\n",
        prompt.verification_uri, prompt.user_code
    );
    if let Some(complete) = &prompt.verification_uri_complete {
        eprintln!("(or open {complete}, which has the code filled in)");
    }
    eprintln!(
        "The code is valid until {}. Waiting for the login…",
        format_timestamp(prompt.expires_at)
    );
}

/// What the redirect must look like.
struct Expected {
    path: String,
    state: String,
    issuer: String,
}

/// Accepts connections until one carries the redirect, the time runs out,
/// or the redirect is refused.
async fn wait_for_redirect(
    listener: TcpListener,
    expected: Arc<Expected>,
    timeout: Duration,
) -> Result<SecretString, OidcError> {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let (tx, mut rx) = mpsc::channel::<Result<SecretString, OidcError>>(1);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropping the set aborts any connection still being served.
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut deadline => return Err(OidcError::Timeout(timeout)),
            Some(result) = rx.recv() => return result,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "loopback accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    continue; // too many at once: drop this one
                };
                let (expected, tx) = (expected.clone(), tx.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    if let Some(result) = serve(stream, &expected).await {
                        let _ = tx.send(result).await;
                    }
                });
                // Reap finished connections.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
}

/// Serves one connection: `None` when it was not the redirect.
async fn serve(
    mut stream: TcpStream,
    expected: &Expected,
) -> Option<Result<SecretString, OidcError>> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return None,
    };
    let target = head.lines().next().and_then(|line| {
        let mut words = line.split(' ');
        match (words.next(), words.next()) {
            (Some("GET"), Some(target)) if target.starts_with('/') => Some(target.to_string()),
            _ => None,
        }
    });
    let Some(target) = target else {
        respond(
            &mut stream,
            400,
            "Bad request",
            "This address only receives a login redirect.",
        )
        .await;
        return None;
    };
    let url = match Url::parse(&format!("http://127.0.0.1{target}")) {
        Ok(u) => u,
        Err(_) => {
            respond(
                &mut stream,
                400,
                "Bad request",
                "This address only receives a login redirect.",
            )
            .await;
            return None;
        }
    };
    if url.path() != expected.path {
        respond(&mut stream, 404, "Not found", "Nothing here.").await;
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut repeated = false;
    for (k, v) in url.query_pairs() {
        repeated |= params.insert(k.to_string(), v.to_string()).is_some();
    }
    // Only the redirect of the login started here counts: it alone knows
    // the state. Anything else is ignored, and the wait goes on.
    let ours = !repeated
        && params
            .get("state")
            .is_some_and(|s| bool::from(s.as_bytes().ct_eq(expected.state.as_bytes())));
    if !ours {
        tracing::debug!(
            "ignored a request to the login listener that is not this login's redirect"
        );
        respond(
            &mut stream,
            400,
            "Not this login",
            "This response does not belong to the login in progress here, and was ignored. If you are logging in, finish the login in the browser window that Postern opened; the terminal is still waiting for it.",
        )
        .await;
        return None;
    }
    let result = evaluate(&params, expected);
    page_for(&mut stream, &result.as_ref().map(|_| ())).await;
    Some(result)
}

/// Checks the parameters of this login's redirect (its state matched).
fn evaluate(
    params: &HashMap<String, String>,
    expected: &Expected,
) -> Result<SecretString, OidcError> {
    if let Some(iss) = params.get("iss") {
        if *iss != expected.issuer {
            return Err(OidcError::IssuerMismatch {
                found: quote(iss),
                expected: expected.issuer.clone(),
            });
        }
    }
    if let Some(error) = params.get("error") {
        let description = params.get("error_description").cloned();
        return Err(match error.as_str() {
            "access_denied" | "consent_required" | "login_required" | "interaction_required"
            | "account_selection_required" => OidcError::AccessDenied {
                error: error.clone(),
                description,
            },
            _ => OidcError::ProviderRefused {
                during: "login",
                error: error.clone(),
                description,
                hint: ": check the client's registration at the provider (redirect URI http://127.0.0.1/… for a native app, allowed scopes and grant types)",
            },
        });
    }
    match params.get("code") {
        Some(code) if !code.is_empty() && code.len() <= MAX_CODE_LEN => {
            Ok(SecretString::new(code.clone()))
        }
        _ => Err(OidcError::BadProviderResponse {
            during: "login redirect",
            reason: "it carries no usable authorization code".into(),
        }),
    }
}

/// Reads up to the end of the request head.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return None;
        }
    }
}

async fn page_for(stream: &mut TcpStream, result: &Result<(), &OidcError>) {
    match result {
        Ok(()) => {
            respond(
                stream,
                200,
                "Logged in",
                "Login complete. You can close this tab and return to the terminal.",
            )
            .await
        }
        Err(e) => {
            respond(
                stream,
                400,
                "Login failed",
                &format!("Login failed: {e}. Return to the terminal."),
            )
            .await
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, title: &str, message: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Postern: {}</title></head>\
         <body style=\"font-family: sans-serif; margin: 3em\"><h1>Postern: {}</h1><p>{}</p></body></html>\n",
        html_escape(title),
        html_escape(title),
        html_escape(message)
    );
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge() -> LoginChallenge {
        LoginChallenge {
            issuer: "http://127.0.0.1:9".into(),
            authorization_endpoint: "http://127.0.0.1:9/auth".into(),
            client_id: "postern".into(),
            scopes: vec!["openid".into(), "groups".into()],
            redirect_uri: "http://127.0.0.1/callback".into(),
            nonce: "the-nonce".into(),
            extra_params: vec![("prompt".into(), "consent".into())],
            expires_at: 0,
        }
    }

    async fn get(url: &str) -> String {
        let u = Url::parse(url).expect("url");
        let addr = format!(
            "{}:{}",
            u.host_str().expect("host"),
            u.port().expect("port")
        );
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let target = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    /// Runs a login whose "browser" requests the given redirect suffix.
    async fn login_with(
        redirect_query: impl Fn(&Url) -> String + Send + 'static,
    ) -> (Result<CodeGrant, OidcError>, String) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let result = browser_login(&challenge(), Duration::from_secs(5), move |url| {
            let url = Url::parse(url).expect("auth url");
            let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
            assert_eq!(q["nonce"], "the-nonce");
            assert_eq!(q["code_challenge_method"], "S256");
            assert_eq!(q["scope"], "openid groups");
            assert_eq!(q["prompt"], "consent");
            let redirect = Url::parse(&q["redirect_uri"]).expect("redirect");
            assert_eq!(redirect.host_str(), Some("127.0.0.1"));
            let base = format!("{}", redirect);
            let query = redirect_query(&url);
            tokio::spawn(async move {
                let _ = get(&format!("{base}favicon.ico")).await;
                let page = get(&format!("{base}?{query}")).await;
                let _ = tx.send(page);
            });
        })
        .await;
        let page = rx.await.unwrap_or_default();
        (result, page)
    }

    fn state_of(url: &Url) -> String {
        url.query_pairs()
            .find(|(k, _)| k == "state")
            .map(|(_, v)| v.into_owned())
            .expect("state")
    }

    #[tokio::test]
    async fn good_redirect_gives_the_code() {
        let (result, page) = login_with(|u| {
            format!(
                "code=abc&state={}&iss=http%3A%2F%2F127.0.0.1%3A9",
                state_of(u)
            )
        })
        .await;
        let grant = result.expect("login");
        assert_eq!(grant.code.expose(), "abc");
        assert_eq!(grant.nonce, "the-nonce");
        assert!(grant.redirect_uri.starts_with("http://127.0.0.1:"));
        assert!(
            page.starts_with("HTTP/1.1 200") && page.contains("Login complete"),
            "{page}"
        );
        assert!(
            !format!("{grant:?}").contains("abc"),
            "code redacted in Debug"
        );
    }

    /// A local process that knows the port but not the state (a stray or
    /// hostile `GET /callback?state=x`, an error with a forged state, a
    /// repeated parameter) cannot end the login: each is answered and
    /// ignored, and the real redirect that follows still logs in.
    #[tokio::test]
    async fn requests_without_the_state_are_ignored_and_the_real_redirect_still_succeeds() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let result = browser_login(&challenge(), Duration::from_secs(5), move |url| {
            let url = Url::parse(url).expect("auth url");
            let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
            let base = q["redirect_uri"].clone();
            let state = state_of(&url);
            tokio::spawn(async move {
                let mut stray = Vec::new();
                for query in [
                    "state=x".to_string(),
                    "code=evil&state=forged".to_string(),
                    "error=access_denied".to_string(),
                    "error=access_denied&state=forged".to_string(),
                    format!("code=evil&state={state}&state={state}"),
                    "code=evil".to_string(),
                ] {
                    stray.push(get(&format!("{base}?{query}")).await);
                }
                let real = get(&format!("{base}?code=abc&state={state}")).await;
                let _ = tx.send((stray, real));
            });
        })
        .await;
        let (stray, real) = rx.await.expect("pages");
        let grant = result.expect("the real redirect logged in");
        assert_eq!(grant.code.expose(), "abc");
        for page in stray {
            assert!(
                page.starts_with("HTTP/1.1 400") && page.contains("was ignored"),
                "{page}"
            );
        }
        assert!(
            real.starts_with("HTTP/1.1 200") && real.contains("Login complete"),
            "{real}"
        );
    }

    #[tokio::test]
    async fn wrong_issuer_and_errors_are_refused() {
        let (r, _) =
            login_with(|u| format!("code=abc&state={}&iss=https%3A%2F%2Fevil", state_of(u))).await;
        assert!(matches!(r, Err(OidcError::IssuerMismatch { .. })), "{r:?}");

        let (r, _) = login_with(|u| {
            format!(
                "error=access_denied&error_description=%3Cb%3Eno&state={}",
                state_of(u)
            )
        })
        .await;
        let e = r.expect_err("denied");
        assert!(matches!(e, OidcError::AccessDenied { .. }), "{e}");

        let (r, _) = login_with(|u| format!("state={}", state_of(u))).await;
        assert!(
            matches!(r, Err(OidcError::BadProviderResponse { .. })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn times_out_when_no_browser_comes() {
        let r = browser_login(&challenge(), Duration::from_millis(200), |_| {}).await;
        let e = r.expect_err("timeout");
        assert!(
            matches!(e, OidcError::Timeout(_)) && e.to_string().contains("--device"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn unusable_challenges_are_refused() {
        let mut c = challenge();
        c.authorization_endpoint = "file:///etc/passwd".into();
        assert!(matches!(
            browser_login(&c, Duration::from_secs(1), |_| {}).await,
            Err(OidcError::BadChallenge(_))
        ));
        let mut c = challenge();
        c.redirect_uri = "http://example.com/callback".into();
        assert!(matches!(
            browser_login(&c, Duration::from_secs(1), |_| {}).await,
            Err(OidcError::BadChallenge(_))
        ));
    }

    #[test]
    fn the_browser_never_inherits_secret_variables() {
        let command = browser_command("http://127.0.0.1:9/auth?x=1");
        let envs: Vec<_> = command.get_envs().collect();
        for name in postern_identity::secret_env::SECRET_VARS {
            assert!(
                envs.contains(&(std::ffi::OsStr::new(name), None)),
                "{name} would reach the browser: {envs:?}"
            );
        }
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args, ["http://127.0.0.1:9/auth?x=1"]);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
