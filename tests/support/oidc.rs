//! A real OpenID Connect provider per test, and a scripted user for it.
//!
//! [`TestProvider::start`] runs `node tests/oidc-provider/provider.mjs`: the
//! npm package `oidc-provider` (OpenID Certified) on a random loopback port,
//! with the clients [`PUBLIC_CLIENT`] and [`OTHER_CLIENT`], users `alice`
//! and `bob` (with `groups` and `team` claims) and `carol` (whose e-mail
//! address is not verified), the device flow, and its
//! development login and consent forms. The process exits when the
//! [`TestProvider`] is dropped (killed and reaped), and by itself when the
//! test process dies (it watches its stdin). Its log goes to a temporary
//! file, quoted when it fails to start.
//!
//! [`FakeUser`] plays the person at the browser over plain HTTP: it follows
//! redirects (resolving relative `Location` headers against the request
//! URL), fills in the login form, the consent form and the device-code
//! forms, and stops when a redirect leaves the provider (the loopback
//! listener of `browser_login`).
//!
//! Needs Node.js >= 20 and `npm ci` in tests/oidc-provider: run
//! `scripts/setup.sh`.

use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// The public (PKCE, no secret) native client registered at the provider.
pub const PUBLIC_CLIENT: &str = "postern-test";
/// Another, confidential, client at the same provider.
pub const OTHER_CLIENT: &str = "other-app";
/// Its secret.
pub const OTHER_CLIENT_SECRET: &str = "other-app-secret";

/// How long one start may take. Node.js 20 very rarely deadlocks at start
/// (in its crypto code, under load), so a start that hangs is retried.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts tried before giving up.
const START_ATTEMPTS: usize = 2;

/// Why one start failed.
enum Start {
    /// No answer: worth another try.
    Hung(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}
const SETUP_HINT: &str =
    "run `scripts/setup.sh` (it installs Node.js if needed and runs `npm ci` in tests/oidc-provider)";

fn provider_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider")
}

/// A running `oidc-provider`, stopped on drop.
#[derive(Debug)]
pub struct TestProvider {
    child: Child,
    /// Held open: the provider exits when it closes.
    _stdin: ChildStdin,
    issuer: String,
    kid: String,
    log: tempfile::NamedTempFile,
}

impl TestProvider {
    /// Starts a provider and waits until it serves.
    pub fn start() -> Result<Self> {
        let dir = provider_dir();
        if !dir
            .join("node_modules/oidc-provider/package.json")
            .is_file()
        {
            bail!(
                "the test OpenID provider is not installed ({} is missing): {SETUP_HINT}",
                dir.join("node_modules/oidc-provider").display()
            );
        }
        let mut hung = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&dir) {
                Ok(provider) => return Ok(provider),
                Err(Start::Hung(e)) => hung = Some(e),
                Err(Start::Failed(e)) => return Err(e),
            }
        }
        Err(hung.unwrap_or_else(|| anyhow!("no start attempt")))
    }

    fn start_once(dir: &Path) -> Result<Self, Start> {
        let failed = |e: anyhow::Error| Start::Failed(e);
        let log = tempfile::NamedTempFile::new()
            .context("creating the provider's log file")
            .map_err(failed)?;
        let stderr = log
            .reopen()
            .context("opening the provider's log")
            .map_err(failed)?;
        let mut child = Command::new(node_bin())
            .arg("provider.mjs")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting `node provider.mjs` in {}: {SETUP_HINT}",
                    dir.display()
                )
            })
            .map_err(failed)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(anyhow!("no pipes to the provider")));
        };

        // The first line on stdout says where it listens.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let res = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
            // Keep draining: a closed pipe would kill the provider on its
            // next write.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let ready = rx.recv_timeout(START_TIMEOUT);
        let read_log = |log: &tempfile::NamedTempFile| {
            let mut text = String::new();
            let _ = log.reopen().and_then(|mut f| f.read_to_string(&mut text));
            text
        };
        let line = match ready {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let (why, retry) = match other {
                    Err(_) => (format!("no answer within {START_TIMEOUT:?}"), true),
                    Ok(Err(e)) => (e.to_string(), false),
                    Ok(Ok(_)) => ("it exited".to_string(), false),
                };
                let e = anyhow!(
                    "the test OpenID provider did not start ({why}); its log:\n{}\n{SETUP_HINT}",
                    read_log(&log)
                );
                return Err(if retry {
                    Start::Hung(e)
                } else {
                    Start::Failed(e)
                });
            }
        };
        let parse = || -> Result<(String, String)> {
            let ready: Value = serde_json::from_str(&line)
                .with_context(|| format!("the provider's ready line {line:?} is not JSON"))?;
            let field = |k: &str| {
                ready[k]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("the provider's ready line lacks {k}: {line}"))
            };
            Ok((field("issuer")?, field("kid")?))
        };
        let (issuer, kid) = match parse() {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(e));
            }
        };
        Ok(TestProvider {
            issuer,
            kid,
            child,
            _stdin: stdin,
            log,
        })
    }

    /// What the provider wrote on stderr so far (for failure messages).
    pub fn log(&self) -> String {
        let mut text = String::new();
        let _ = self
            .log
            .reopen()
            .and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key id the provider signs ID tokens with.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// An `[oidc]` configuration (TOML) for this provider, with `groups` and
    /// `team` mapped, plus `extra` lines.
    pub fn config_toml(&self, client_id: &str, extra: &str) -> String {
        format!(
            "issuer_url = \"{}\"\nclient_id = \"{client_id}\"\n\
             scopes = [\"openid\", \"email\", \"profile\", \"groups\", \"offline_access\"]\n\
             {extra}\n[claims]\ngroups = \"groups\"\nteam = \"team\"\n",
            self.issuer
        )
    }

    /// Disables an account at the provider: its logins and refresh tokens
    /// are refused from now on.
    pub async fn disable(&self, account: &str) -> Result<()> {
        self.admin("disable", account).await
    }

    /// Enables a disabled account again.
    pub async fn enable(&self, account: &str) -> Result<()> {
        self.admin("enable", account).await
    }

    async fn admin(&self, action: &str, account: &str) -> Result<()> {
        let url = format!("{}/test-admin/{action}?account={account}", self.issuer);
        let res = reqwest::Client::new().post(&url).send().await?;
        if !res.status().is_success() {
            bail!(
                "{url}: {} {}",
                res.status(),
                res.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The provider's token endpoint, from its discovery document.
    pub async fn token_endpoint(&self) -> Result<String> {
        let text = reqwest::get(format!("{}/.well-known/openid-configuration", self.issuer))
            .await?
            .text()
            .await?;
        let doc: Value = serde_json::from_str(&text)?;
        doc["token_endpoint"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token_endpoint in the discovery document"))
    }

    /// Redeems a code directly at the token endpoint, as any application
    /// registered at the provider can, and returns the raw token response.
    /// Lets tests get a genuine ID token to present to the verifier.
    pub async fn redeem(
        &self,
        client_id: &str,
        secret: Option<&str>,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<Value> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("redirect_uri", redirect_uri),
        ];
        let mut req = reqwest::Client::new().post(self.token_endpoint().await?);
        match secret {
            Some(s) => req = req.basic_auth(client_id, Some(s)),
            None => form.push(("client_id", client_id)),
        }
        let res = req.form(&form).send().await?;
        let status = res.status();
        let body: Value = serde_json::from_str(&res.text().await?)?;
        if !status.is_success() {
            bail!("token endpoint answered {status}: {body}");
        }
        Ok(body)
    }
}

impl Drop for TestProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Node.js to run: the private runtime `scripts/setup.sh` installs from
/// the npm registry when the system's Node.js is older than 20, else `node`
/// from `PATH`.
pub fn node_bin() -> std::path::PathBuf {
    let runtime = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/oidc-provider/.node-runtime/node_modules");
    for arch in ["x64", "arm64"] {
        let bin = runtime.join(format!("node-linux-{arch}/bin/node"));
        if bin.is_file() {
            return bin;
        }
    }
    std::path::PathBuf::from("node")
}

/// A freshly generated RSA private key (PKCS#1 PEM) that the provider has
/// never seen, for forging tokens.
pub fn foreign_rsa_key_pem() -> Result<String> {
    let out = Command::new(node_bin())
        .args([
            "-e",
            "const {generateKeyPairSync} = require('node:crypto');\
             const {privateKey} = generateKeyPairSync('rsa', {modulusLength: 2048,\
               publicKeyEncoding: {type: 'spki', format: 'pem'},\
               privateKeyEncoding: {type: 'pkcs1', format: 'pem'}});\
             process.stdout.write(privateKey);",
        ])
        .output()
        .context("running node to generate an RSA key")?;
    if !out.status.success() {
        bail!("node failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The person at the browser, scripted.
#[derive(Debug, Clone)]
pub struct FakeUser {
    http: reqwest::Client,
    login: String,
}

/// How many requests one walk through the provider's pages may take.
const MAX_STEPS: usize = 25;

impl FakeUser {
    /// A user who logs in as `login` (any password works).
    pub fn new(login: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(FakeUser {
            http,
            login: login.to_string(),
        })
    }

    /// Opens an authorization URL and logs in and consents until the
    /// provider redirects away from itself; returns that URL and the page
    /// found there (the loopback listener's answer).
    pub async fn authorize(&self, auth_url: &str) -> Result<(Url, String)> {
        let start = Url::parse(auth_url)?;
        self.walk(start, None).await
    }

    /// Enters `user_code` at the verification URI, confirms, logs in and
    /// consents; returns the provider's final page.
    pub async fn approve_device(&self, verification_uri: &str, user_code: &str) -> Result<String> {
        let start = Url::parse(verification_uri)?;
        let (_, page) = self.walk(start, Some(user_code)).await?;
        if !page.contains("Sign-in Success") {
            bail!(
                "the device login did not succeed; last page:\n{}",
                excerpt(&page)
            );
        }
        Ok(page)
    }

    async fn walk(&self, start: Url, user_code: Option<&str>) -> Result<(Url, String)> {
        let origin = start.origin();
        let (mut method, mut url, mut form) = (Method::GET, start, None::<Vec<(String, String)>>);
        // Requests so far, for error messages.
        let mut trail: Vec<String> = Vec::new();
        for _ in 0..MAX_STEPS {
            trail.push(format!("{method} {}", url.path()));
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(fields) = &form {
                req = req.form(fields);
            }
            let res = req
                .send()
                .await
                .with_context(|| format!("{method} {url} (requests: {})", trail.join(", ")))?;
            let status = res.status();
            if status.is_redirection() {
                let location = res
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| anyhow!("{status} without Location from {url}"))?;
                // Relative locations are relative to the request URL.
                url = url
                    .join(location)
                    .with_context(|| format!("Location {location:?}"))?;
                (method, form) = (Method::GET, None);
                continue;
            }
            let body = res.text().await?;
            if url.origin() != origin {
                return Ok((url, body));
            }
            if status != StatusCode::OK {
                bail!(
                    "the provider answered {status} at {url}:\n{}",
                    excerpt(&body)
                );
            }
            if body.contains("Sign-in Success") {
                return Ok((url, body));
            }
            let Some(page_form) = parse_form(&body) else {
                bail!("no form to fill on {url}:\n{}", excerpt(&body));
            };
            let mut fields = page_form.fields;
            for (name, value) in fields.iter_mut() {
                match name.as_str() {
                    "login" => *value = self.login.clone(),
                    "password" => *value = "any password".into(),
                    "user_code" if value.is_empty() => {
                        *value = user_code
                            .ok_or_else(|| anyhow!("the provider asks for a user code"))?
                            .to_string();
                    }
                    _ => {}
                }
            }
            url = url.join(&page_form.action)?;
            (method, form) = (Method::POST, Some(fields));
        }
        bail!("gave up after {MAX_STEPS} requests through the provider's pages");
    }
}

/// The first form of a page: its action and its inputs.
struct Form {
    action: String,
    fields: Vec<(String, String)>,
}

fn parse_form(html: &str) -> Option<Form> {
    let start = html.find("<form")?;
    let rest = &html[start..];
    let tag_end = rest.find('>')?;
    let action = attr(&rest[..tag_end], "action")?;
    let body = &rest[tag_end..rest.find("</form>").unwrap_or(rest.len())];
    let mut fields = Vec::new();
    let mut cursor = body;
    while let Some(i) = cursor.find("<input") {
        let tag = &cursor[i..];
        let end = tag.find('>').unwrap_or(tag.len());
        let tag = &tag[..end];
        if let Some(name) = attr(tag, "name") {
            fields.push((name, attr(tag, "value").unwrap_or_default()));
        }
        cursor = &cursor[i + end..];
    }
    Some(Form { action, fields })
}

/// The value of attribute `name="…"` in a tag, entities decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let mut from = 0;
    while let Some(i) = tag[from..].find(&needle) {
        let at = from + i;
        let preceded_by_space = tag[..at].chars().last().is_some_and(char::is_whitespace);
        if preceded_by_space {
            let value_start = at + needle.len();
            let len = tag[value_start..].find('"')?;
            return Some(decode_entities(&tag[value_start..value_start + len]));
        }
        from = at + needle.len();
    }
    None
}

fn decode_entities(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2F;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn excerpt(text: &str) -> String {
    text.chars().take(2000).collect()
}

/// The login address that `postern enroll --oidc --no-browser` printed on
/// stderr (`show_login_url`: an indented line holding the authorization
/// request), if it did yet.
pub fn login_url_in(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("http") && l.contains("code_challenge="))
        .map(str::to_string)
}

/// The verification URI and user code that `postern enroll --oidc --device`
/// printed on stderr (`show_device_prompt`), if it did yet.
pub fn device_prompt_in(stderr: &str) -> Option<(String, String)> {
    let mut lines = stderr.lines();
    let uri = lines.by_ref().find_map(|l| {
        l.strip_prefix("To log in, open ")?
            .strip_suffix(" in a browser on any device and enter the code")
            .map(str::to_string)
    })?;
    let code = lines.map(str::trim).find(|l| !l.is_empty())?.to_string();
    Some((uri, code))
}
