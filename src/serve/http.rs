//! The HTTP side: routes, API keys, body limits, the connection limit, server-sent events, and
//! graceful shutdown. Handlers check a request into a [`GenRequest`], submit its sequences to
//! the scheduler and turn the scheduler's events into one JSON body or an SSE stream (OpenAI's
//! chunks, ending with `data: [DONE]`). A client that goes away drops its event channel, which
//! the scheduler notices and retires the sequences.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::OwnedSemaphorePermit;

use super::api::{
    chat_role_choice, chunk, chunk_choice, parse_request, response_body, usage, ApiError,
    ChoiceResult, Endpoint, GenRequest, ParseContext,
};
use super::registry::{unix_now, ModelEntry};
use super::scheduler::{Event, Job, Refusal, SeqParams};
use super::App;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            self.body().to_string(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The router of every endpoint.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/prefixes", post(load_prefix))
        .route("/v1/prefixes/{name}", delete(unload_prefix))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::new(
        404,
        "invalid_request_error",
        format!("no such endpoint: {method} {}", uri.path()),
    )
    .code("unknown_url")
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        405,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Refuses a request without one of the configured API keys (none configured: all pass).
fn check_api_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    if app.api_keys.is_empty() {
        return Ok(());
    }
    match bearer(headers) {
        None => Err(ApiError::new(
            401,
            "authentication_error",
            "missing API key: send the header Authorization: Bearer KEY",
        )
        .code("invalid_api_key")),
        Some(k) if app.api_keys.iter().any(|key| same_secret(k, key)) => Ok(()),
        Some(_) => Err(
            ApiError::new(401, "authentication_error", "invalid API key").code("invalid_api_key"),
        ),
    }
}

/// Refuses prefix loading/unloading unless an admin key is configured and given.
fn check_admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(admin) = &app.admin_key else {
        return Err(ApiError::new(
            403,
            "permission_error",
            "loading and unloading prefixes is disabled on this server: start it with \
             --admin-key-file FILE (or PREFIX_TUNE_ADMIN_KEY)",
        ));
    };
    match bearer(headers) {
        Some(k) if same_secret(k, admin) => Ok(()),
        _ => Err(ApiError::new(
            401,
            "authentication_error",
            "this endpoint needs the admin key: Authorization: Bearer ADMIN_KEY",
        )
        .code("invalid_api_key")),
    }
}

/// The body, at most `app.max_body_bytes`.
async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.max_body_bytes;
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is larger than this server's limit of {limit} bytes"),
        )
        .code("request_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            src = s.source();
        }
        ApiError::bad_request(format!("reading the request body: {e}"))
    })
}

fn model_json(e: &ModelEntry) -> Value {
    let mut v = json!({
        "id": e.id,
        "object": "model",
        "created": e.created,
        "owned_by": "prefix-tune",
        "root": e.parent.clone().unwrap_or_else(|| e.id.clone()),
        "parent": e.parent,
    });
    if let Some(p) = e.positions {
        v["prefix_len"] = json!(e.prefix_len);
        v["positions"] = json!(crate::prefix::file::positions_name(p));
    }
    v
}

async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = match check_api_key(&app, &headers) {
        Ok(()) => {
            let data: Vec<Value> = app.registry.entries().iter().map(model_json).collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        Err(e) => e.into_response(),
    };
    app.metrics.request("/v1/models", r.status().as_u16());
    r
}

async fn get_model(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let r = match check_api_key(&app, &headers) {
        Err(e) => e.into_response(),
        Ok(()) => match app.registry.entries().into_iter().find(|e| e.id == id) {
            Some(e) => json_response(StatusCode::OK, &model_json(&e)),
            None => ApiError::new(
                404,
                "invalid_request_error",
                format!("the model '{id}' does not exist"),
            )
            .code("model_not_found")
            .into_response(),
        },
    };
    app.metrics.request("/v1/models", r.status().as_u16());
    r
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.scheduler.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"status": "draining"}).to_string(),
        )
            .into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(app.registry.prefix_names().len()),
    )
        .into_response()
}

async fn load_prefix(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let r = match load_prefix_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    app.metrics.request("/v1/prefixes", r.status().as_u16());
    r
}

async fn load_prefix_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_admin(app, headers)?;
    let bytes = read_body(app, headers, body).await?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
            .code("invalid_json")
    })?;
    let field = |k: &str| -> Result<String, ApiError> {
        match v.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(other) => Err(ApiError::field(
                k,
                format!("'{k}' must be a non-empty string, got {other}"),
            )),
            None => Err(ApiError::field(k, format!("'{k}' is required"))),
        }
    };
    let name = field("name")?;
    let path = PathBuf::from(field("path")?);
    super::registry::check_prefix_name(&name)
        .map_err(|e| ApiError::field("name", e.to_string()))?;
    if app.registry.prefix(&name).is_some() || name == app.registry.base() {
        return Err(ApiError::new(
            409,
            "invalid_request_error",
            format!("a model or prefix named '{name}' is already loaded (DELETE /v1/prefixes/{name} first)"),
        )
        .code("already_exists"));
    }
    if !app.prefix_dirs.is_empty() {
        let real = path
            .canonicalize()
            .map_err(|e| ApiError::field("path", format!("prefix {}: {e}", path.display())))?;
        if !app.prefix_dirs.iter().any(|d| real.starts_with(d)) {
            return Err(ApiError::new(
                403,
                "permission_error",
                format!(
                    "prefix {}: outside the directories this server may load prefixes from \
                     (--prefix-dir)",
                    path.display()
                ),
            ));
        }
    }
    let app2 = app.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        app2.registry
            .load(&name, &path, &app2.config, &app2.fingerprint)
            .map(|t| app2.registry.entry(&t))
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("loading the prefix: {e}")))?
    .map_err(|e| ApiError::field("path", format!("{e:#}")))?;
    Ok(json_response(StatusCode::CREATED, &model_json(&loaded)))
}

async fn unload_prefix(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let r = match check_admin(&app, &headers) {
        Err(e) => e.into_response(),
        Ok(()) => match app.registry.remove(&name) {
            Some(t) => json_response(
                StatusCode::OK,
                &json!({
                    "id": format!("{}:{}", app.registry.base(), t.name),
                    "object": "prefix",
                    "deleted": true,
                }),
            ),
            None => ApiError::new(
                404,
                "invalid_request_error",
                format!("no prefix named '{name}' is loaded"),
            )
            .code("model_not_found")
            .into_response(),
        },
    };
    app.metrics.request("/v1/prefixes", r.status().as_u16());
    r
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generation(app, Endpoint::Completions, headers, body).await
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generation(app, Endpoint::Chat, headers, body).await
}

async fn generation(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let r = match generation_inner(&app, endpoint, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    app.metrics.request(endpoint.path(), r.status().as_u16());
    r
}

/// A random id like OpenAI's.
fn new_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

async fn generation_inner(
    app: &Arc<App>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    check_api_key(app, headers)?;
    let bytes = read_body(app, headers, body).await?;
    let app2 = app.clone();
    // Tokenizing and templating can take a while for long prompts: off the async threads.
    let req = tokio::task::spawn_blocking(move || {
        let ctx = ParseContext {
            registry: &app2.registry,
            tokenizer: &app2.tokenizer,
            chat: app2.chat.as_ref(),
            config: &app2.config,
            eos: &app2.eos,
            limits: app2.limits,
        };
        parse_request(endpoint, &bytes, &ctx)
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("reading the request: {e}")))??;
    let req = Arc::new(req);
    let (tx, rx) = unbounded_channel();
    let mut jobs = Vec::with_capacity(req.sequences());
    for (p, prompt) in req.prompts.iter().enumerate() {
        for j in 0..req.n {
            let choice = p * req.n + j;
            jobs.push(Job {
                task: req.task.clone(),
                prompt: prompt.clone(),
                choice,
                params: Arc::new(SeqParams {
                    strategy: req.strategy,
                    rng_index: choice,
                    max_tokens: req.max_tokens,
                    stop: req.stop.clone(),
                    eos: if req.ignore_eos {
                        Vec::new()
                    } else {
                        app.eos.clone()
                    },
                    logprobs: req.logprobs,
                }),
                events: tx.clone(),
                arrived,
            });
        }
    }
    drop(tx);
    app.scheduler.submit(jobs).map_err(|r| match r {
        Refusal::QueueFull => ApiError::new(
            429,
            "rate_limit_error",
            "the server's queue is full; retry later",
        )
        .code("queue_full")
        .retry_after(1),
        Refusal::Draining => ApiError::new(
            503,
            "server_error",
            "the server is shutting down and takes no new requests",
        )
        .code("service_unavailable")
        .retry_after(5),
    })?;
    let id = new_id(endpoint);
    let created = unix_now();
    if req.stream {
        let stream = EventStream::new(app.clone(), req, rx, id, created);
        let mut r = Response::new(Body::new(stream));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }
    let choices = collect(&req, rx).await?;
    Ok(json_response(
        StatusCode::OK,
        &response_body(&req, &app.tokenizer, &id, created, &choices),
    ))
}

/// Waits for every choice of a request.
async fn collect(
    req: &GenRequest,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Vec<ChoiceResult>, ApiError> {
    let total = req.sequences();
    let mut out = vec![ChoiceResult::default(); total];
    let mut finished = 0;
    while finished < total {
        match rx.recv().await {
            None => {
                return Err(ApiError::new(
                    500,
                    "server_error",
                    "the scheduler stopped before the request was done",
                ))
            }
            Some(Event::Token {
                choice,
                token,
                text,
                logprob,
            }) => {
                let c = &mut out[choice];
                c.text.push_str(&text);
                c.tokens.push(token);
                c.logprobs.extend(logprob);
            }
            Some(Event::Finished {
                choice,
                reason,
                text,
                ..
            }) => {
                out[choice].text.push_str(&text);
                out[choice].finish = Some(reason);
                finished += 1;
            }
            Some(Event::Failed { message, .. }) => {
                return Err(ApiError::new(500, "server_error", message))
            }
        }
    }
    Ok(out)
}

/// An SSE response body fed by the scheduler's events.
struct EventStream {
    app: Arc<App>,
    req: Arc<GenRequest>,
    rx: UnboundedReceiver<Event>,
    id: String,
    created: u64,
    frames: VecDeque<Bytes>,
    /// Characters of text sent per choice (logprobs' text offsets).
    offsets: Vec<usize>,
    finished: usize,
    completion_tokens: usize,
    done: bool,
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl EventStream {
    fn new(
        app: Arc<App>,
        req: Arc<GenRequest>,
        rx: UnboundedReceiver<Event>,
        id: String,
        created: u64,
    ) -> Self {
        let total = req.sequences();
        let mut s = EventStream {
            app,
            rx,
            id,
            created,
            frames: VecDeque::new(),
            offsets: vec![0; total],
            finished: 0,
            completion_tokens: 0,
            done: false,
            req,
        };
        if s.req.endpoint == Endpoint::Chat {
            for i in 0..total {
                let c = chunk(&s.req, &s.id, s.created, vec![chat_role_choice(i)]);
                s.frames.push_back(frame(&c));
            }
        }
        s
    }

    fn handle(&mut self, e: Event) {
        let tok = &self.app.tokenizer;
        match e {
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                if text.is_empty() && logprob.is_none() && !self.req.return_token_ids {
                    return;
                }
                let c = chunk_choice(
                    &self.req,
                    tok,
                    choice,
                    &text,
                    &[(token, logprob)],
                    self.offsets[choice],
                    None,
                );
                self.offsets[choice] += text.chars().count();
                let v = chunk(&self.req, &self.id, self.created, vec![c]);
                self.frames.push_back(frame(&v));
            }
            Event::Finished {
                choice,
                reason,
                text,
                completion_tokens,
            } => {
                let c = chunk_choice(
                    &self.req,
                    tok,
                    choice,
                    &text,
                    &[],
                    self.offsets[choice],
                    Some(reason),
                );
                let mut v = chunk(&self.req, &self.id, self.created, vec![c]);
                self.finished += 1;
                self.completion_tokens += completion_tokens;
                let last = self.finished == self.req.sequences();
                let u = usage(self.req.prompt_tokens(), self.completion_tokens);
                if last && !self.req.include_usage {
                    v["usage"] = u.clone();
                }
                self.frames.push_back(frame(&v));
                if last {
                    if self.req.include_usage {
                        let mut v = chunk(&self.req, &self.id, self.created, Vec::new());
                        v["usage"] = u;
                        self.frames.push_back(frame(&v));
                    }
                    self.end();
                }
            }
            Event::Failed { message, .. } => {
                let e = ApiError::new(500, "server_error", message);
                self.frames.push_back(frame(&e.body()));
                self.end();
            }
        }
    }

    fn end(&mut self) {
        self.frames
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
        self.rx.close();
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(b) = self.frames.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(e)) => self.handle(e),
                Poll::Ready(None) => {
                    let e = ApiError::new(
                        500,
                        "server_error",
                        "the scheduler stopped before the request was done",
                    );
                    self.frames.push_back(frame(&e.body()));
                    self.end();
                }
            }
        }
    }
}

/// A connection holding one of the limited places.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    app: Arc<App>,
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        let open = self.app.max_connections - self.app.connections.available_permits() - 1;
        self.app.metrics.open_connections.set(open);
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A TCP listener that holds at most `max_connections` connections open; past that, a new
/// connection is answered `503` with `Retry-After` and closed.
pub struct LimitedListener {
    pub inner: TcpListener,
    pub app: Arc<App>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little and go on.
                    eprintln!("serve: accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.app.connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let open = self.app.max_connections - self.app.connections.available_permits();
                    self.app.metrics.open_connections.set(open);
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                            app: self.app.clone(),
                        },
                        addr,
                    );
                }
                Err(_) => {
                    self.app.metrics.refused_connections.add(1);
                    tokio::spawn(refuse_connection(stream));
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse_connection(mut stream: TcpStream) {
    let body = ApiError::new(
        503,
        "server_error",
        "too many open connections; retry later",
    )
    .code("service_unavailable")
    .body()
    .to_string();
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), write).await;
}
