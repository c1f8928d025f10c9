//! Callback delivery: the outbox insert (inside the terminal transaction),
//! and the loop that claims due deliveries with a lease, signs and POSTs
//! them, records every attempt, and reschedules failures.
//!
//! Outcomes, as the contract has them: a 2xx is delivered; anything else —
//! a 3xx (never followed), another status (410 too), a timeout, a refused
//! connection, a DNS failure — is retried on the schedule (a 429 or 503 `Retry-After` is
//! honoured, clamped) until it runs out, and then the delivery is dead.

pub mod payload;
pub mod schedule;
pub mod sign;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use sqlx::SqliteConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::callbacks::{self, Attempt, Due, NewCallback, Recorded};
use crate::db::{self, output, Db};
use crate::domain::Stream;
use payload::StreamTail;
use schedule::Schedule;

/// Response bytes kept per attempt.
const RESPONSE_KEEP: usize = 4 << 10;
/// In flight to one receiver, fewer than this: it may use the slots kept
/// for receivers that answer (see `Deliverer::has_room`).
const LIGHT: usize = 4;
/// Payload bytes of the deliveries held in memory waiting for a permit (or
/// for their receiver): past it, completions leave theirs in the database,
/// to be claimed from there.
const WAITING_BYTES: usize = 16 << 20;
/// How long an attempt in flight when the agent stops may go on.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What the delivery loop needs, fixed at start.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// This agent's boot id: the lease owner.
    pub owner: String,
    pub schedule: Schedule,
    /// One attempt's whole time: connect, send, response.
    pub timeout: Duration,
    pub concurrency: usize,
    /// Attempts in flight at once to one receiver (its origin).
    pub receiver_concurrency: usize,
    /// Output per stream in a payload (the tail).
    pub payload_output_bytes: usize,
    /// Safety-net poll when nothing is due sooner.
    pub poll_interval: Duration,
}

/// A lease taken with the insert: (owner, until).
pub type Lease = (String, String);

/// Queues the callback of `execution_id` if it is an async execution: its
/// payload is frozen now, from what is in the same transaction. With a
/// `lease`, the delivery is leased at once and returned, to be handed to the
/// delivery loop without a claim (`Deliverer::dispatch`).
pub async fn enqueue(
    conn: &mut SqliteConnection,
    execution_id: &str,
    payload_output_bytes: usize,
    lease: Option<Lease>,
) -> Result<Option<Due>, sqlx::Error> {
    let Some(source) = callbacks::source(conn, execution_id).await? else {
        return Ok(None);
    };
    let mut tails = [StreamTail::default(), StreamTail::default()];
    for (tail, (stream, stored)) in tails.iter_mut().zip([
        (Stream::Stdout, source.stdout_bytes),
        (Stream::Stderr, source.stderr_bytes),
    ]) {
        // Most jobs write nothing to one of their streams: no query for it.
        if stored > 0 {
            let (bytes, cut) = output::read_tail(
                &mut *conn,
                execution_id,
                source.attempt,
                stream,
                payload_output_bytes,
            )
            .await?;
            *tail = StreamTail { bytes, cut };
        }
    }
    let [stdout, stderr] = tails;
    let now = db::now();
    let new = NewCallback {
        id: format!("msg_{}", ulid::Ulid::new().to_string().to_lowercase()),
        execution_id: execution_id.to_string(),
        url: source.callback_url.clone(),
        headers: source
            .callback_headers
            .clone()
            .unwrap_or_else(|| "{}".into()),
        payload: payload::build(
            &source,
            &stdout,
            &stderr,
            payload_output_bytes,
            &crate::http::timestamp_now(),
        ),
        now,
        lease,
    };
    callbacks::insert(conn, &new).await?;
    Ok(Some(Due {
        id: new.id,
        execution_id: new.execution_id,
        url: new.url,
        headers: new.headers,
        payload: new.payload,
        attempts: 0,
        secret: source.callback_secret,
        created_at: new.now,
    }))
}

pub struct Deliverer {
    db: Db,
    config: DeliveryConfig,
    client: reqwest::Client,
    /// Woken when a delivery is handed over, an attempt ends (a permit is
    /// free), or the next claim moves sooner.
    wake: Notify,
    /// When the loop next claims due deliveries from the database: at start,
    /// when told some may be due (`wake`), when a retry falls due, and a poll
    /// after the last claim. Deliveries handed over with their lease need no
    /// claim, so a burst of completions costs the writer no claims.
    claim_at: std::sync::Mutex<Instant>,
    /// Attempts in flight, waited for on shutdown.
    tasks: TaskTracker,
    /// Leased deliveries waiting for a permit, or for their receiver to
    /// have fewer than its share in flight: handed over with their insert
    /// (their first attempt skips the claim), or claimed.
    waiting: std::sync::Mutex<Waiting>,
    /// Attempts in flight, by receiver (`origin`).
    in_flight: std::sync::Mutex<HashMap<String, usize>>,
}

/// Deliveries held in memory: in order per receiver, the receivers taking
/// turns; and their payloads' bytes.
#[derive(Default)]
struct Waiting {
    by_receiver: HashMap<String, VecDeque<Due>>,
    /// Receivers with deliveries waiting, in the order they get the next turn.
    turns: VecDeque<String>,
    bytes: usize,
}

impl Waiting {
    fn push(&mut self, due: Due) {
        let receiver = origin(&due.url);
        self.bytes += due.payload.len();
        let queue = self.by_receiver.entry(receiver.clone()).or_insert_with(|| {
            self.turns.push_back(receiver);
            VecDeque::new()
        });
        queue.push_back(due);
    }

    /// The oldest delivery of the first receiver, in turn, that is not
    /// `full`; that receiver's next turn is after the others'.
    fn pop(&mut self, full: impl Fn(&str) -> bool) -> Option<Due> {
        let at = self.turns.iter().position(|r| !full(r))?;
        let receiver = self.turns.remove(at)?;
        let queue = self.by_receiver.get_mut(&receiver)?;
        let due = queue.pop_front()?;
        if queue.is_empty() {
            self.by_receiver.remove(&receiver);
        } else {
            self.turns.push_back(receiver);
        }
        self.bytes -= due.payload.len();
        Some(due)
    }

    fn held(&self, receiver: &str) -> usize {
        self.by_receiver.get(receiver).map_or(0, VecDeque::len)
    }
}

/// The receiver a delivery goes to: its URL's scheme, host and port, as
/// the URL is stored (normalized) up to its path; the whole URL if that
/// cannot be read.
fn origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let origin = format!("{}/", parsed.origin().ascii_serialization());
            match url.starts_with(&origin) {
                true => origin,
                false => url.to_string(),
            }
        }
        Err(_) => url.to_string(),
    }
}

/// When the next delivery can be claimed.
#[derive(Clone, Copy)]
enum NextDue {
    Now,
    In(Duration),
    /// None is waiting.
    Nothing,
    /// The read failed: a claim goes ahead, the next look is a poll away.
    Unknown,
}

impl Deliverer {
    pub fn new(db: Db, config: DeliveryConfig) -> Arc<Deliverer> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .build()
            .expect("an HTTP client with static settings builds");
        Arc::new(Deliverer {
            db,
            config,
            client,
            wake: Notify::new(),
            claim_at: std::sync::Mutex::new(Instant::now()),
            tasks: TaskTracker::new(),
            waiting: std::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
        })
    }

    /// Wakes the loop to claim at once: a delivery may be due that was not
    /// handed over (queued without a lease, or made due now).
    pub fn wake(&self) {
        self.claim_by(Instant::now());
    }

    /// Has the loop claim no later than `at`.
    fn claim_by(&self, at: Instant) {
        let mut claim_at = self.claim_at.lock().unwrap();
        if at < *claim_at {
            *claim_at = at;
            drop(claim_at);
            self.wake.notify_one();
        }
    }

    /// Whether a claim is due; if so, the next one is put a poll away until
    /// told otherwise (a wake from now on brings it back, so none is lost).
    fn claim_due_now(&self) -> bool {
        let now = Instant::now();
        let mut claim_at = self.claim_at.lock().unwrap();
        if *claim_at > now {
            return false;
        }
        *claim_at = now + self.config.poll_interval;
        true
    }

    /// A lease for deliveries inserted now, to be handed over (`dispatch`)
    /// once committed; `None` while the deliveries waiting in memory hold
    /// `WAITING_BYTES` already (a dead receiver's, say): then they stay in
    /// the database, unleased, and are claimed from there (`wake`). A lease
    /// holds the row until its attempt is recorded, or the next start frees
    /// it (`claim_due`); its end is when the attempt should be over, for an
    /// operator to read.
    pub fn lease(&self) -> Option<Lease> {
        if self.waiting.lock().unwrap().bytes >= WAITING_BYTES {
            return None;
        }
        let until = chrono::Utc::now() + self.config.timeout + Duration::from_secs(30);
        Some((self.config.owner.clone(), db::timestamp(until)))
    }

    /// Hands over deliveries leased with their insert (committed).
    pub fn dispatch(&self, due: Vec<Due>) {
        if due.is_empty() {
            return;
        }
        self.hold(due);
        self.wake.notify_one();
    }

    /// Keeps leased deliveries in memory until they can be attempted.
    fn hold(&self, due: Vec<Due>) {
        let mut waiting = self.waiting.lock().unwrap();
        for delivery in due {
            waiting.push(delivery);
        }
    }

    /// Whether a receiver with `busy` deliveries (in flight, or held for
    /// it) may have another, with `free` attempt slots free: below its
    /// share; and the last quarter of the slots only for receivers with
    /// fewer than `LIGHT` in flight. Without that reserve, two dead
    /// receivers took every slot, and a healthy one's callback waited a
    /// whole timeout.
    fn has_room(&self, busy: usize, free: usize) -> bool {
        busy < self.config.receiver_concurrency
            && (busy < LIGHT || free > self.config.concurrency / 4)
    }

    /// A waiting delivery whose receiver has room (`has_room`; the
    /// receivers in turn), counted in flight from now.
    fn next_waiting(&self, free: usize) -> Option<Due> {
        let mut waiting = self.waiting.lock().unwrap();
        let mut in_flight = self.in_flight.lock().unwrap();
        let busy = |r: &str| in_flight.get(r).copied().unwrap_or(0);
        let due = waiting.pop(|r| !self.has_room(busy(r), free))?;
        *in_flight.entry(origin(&due.url)).or_default() += 1;
        Some(due)
    }

    /// An attempt to `url` ended. A receiver that had its whole share in
    /// flight was left out of claims: unless one of its deliveries waits in
    /// memory already (the loop starts it, woken by the attempt's end), a
    /// claim is due now. (Not a look at the database per attempt: with the
    /// receiver left out, that look reads every row due.)
    fn landed(&self, url: &str) {
        let origin = origin(url);
        let mut in_flight = self.in_flight.lock().unwrap();
        let count = in_flight.entry(origin.clone()).or_default();
        let was_full = *count >= self.config.receiver_concurrency;
        *count = count.saturating_sub(1);
        if *count == 0 {
            in_flight.remove(&origin);
        }
        drop(in_flight);
        if was_full && self.waiting.lock().unwrap().held(&origin) == 0 {
            self.claim_by(Instant::now());
        }
    }

    /// Receivers that get no more deliveries claimed now, with `free` slots
    /// free: counting those in flight and those waiting in memory, they
    /// have no room (`has_room`). As a JSON array of URL prefixes.
    fn full_receivers(&self, free: usize) -> String {
        let waiting = self.waiting.lock().unwrap();
        let mut counts = self.in_flight.lock().unwrap().clone();
        for (receiver, queue) in &waiting.by_receiver {
            *counts.entry(receiver.clone()).or_default() += queue.len();
        }
        let full: Vec<&String> = counts
            .iter()
            .filter(|(_, n)| !self.has_room(**n, free))
            .map(|(origin, _)| origin)
            .collect();
        serde_json::to_string(&full).expect("strings serialize")
    }

    /// Frees the leases of earlier boots (their POSTs died with them), then
    /// runs the loop until `shutdown`, and waits for attempts in flight.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let owner = this.config.owner.clone();
            let released = this
                .db
                .writer
                .write_one(move |c| {
                    Box::pin(async move { callbacks::release_foreign_leases(c, &owner).await })
                })
                .await;
            match released {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    count = n,
                    "callbacks interrupted by an earlier run will be retried"
                ),
                Err(e) => tracing::error!(error = %e, "cannot release callback leases"),
            }
            this.run(shutdown).await;
            this.tasks.close();
            this.tasks.wait().await;
        })
    }

    async fn run(self: &Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        loop {
            // Deliveries held in memory go first, without a claim.
            self.start_waiting(&permits, &shutdown);
            let free = permits.available_permits();
            if free > 0 && self.claim_due_now() {
                // A look first (a read): with nothing due, an idle agent
                // writes nothing, and the next look is when something is.
                let looked = self.next_due(free).await;
                let skipped = matches!(looked, NextDue::In(_) | NextDue::Nothing);
                let claimed = match skipped {
                    true => Ok(Vec::new()),
                    false => self.claim(free).await,
                };
                match claimed {
                    Ok(due) => {
                        let full = due.len() == free;
                        // Claimed for receivers with room at the claim; past
                        // a receiver's share they wait in memory.
                        self.hold(due);
                        self.start_waiting(&permits, &shutdown);
                        // More may be due: claim again once a permit is free.
                        // After a claim the database has changed: look again.
                        let next = match (full, skipped) {
                            (true, _) => Instant::now(),
                            (false, true) => Instant::now() + self.wait_for(looked),
                            (false, false) => {
                                let free = permits.available_permits();
                                Instant::now() + self.wait_for(self.next_due(free).await)
                            }
                        };
                        self.claim_by(next);
                    }
                    Err(e) => tracing::error!(error = %e, "claiming callbacks failed"),
                }
            }
            // With no permit free, an attempt's end wakes the loop.
            let claim_at = *self.claim_at.lock().unwrap();
            let timer = async {
                if permits.available_permits() > 0 {
                    tokio::time::sleep_until(claim_at.into()).await;
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = timer => {}
            }
        }
    }

    /// Starts the waiting deliveries that have a permit and room at their
    /// receiver.
    fn start_waiting(self: &Arc<Self>, permits: &Arc<Semaphore>, shutdown: &CancellationToken) {
        loop {
            let free = permits.available_permits();
            if free == 0 {
                break;
            }
            let Some(due) = self.next_waiting(free) else {
                break;
            };
            let permit = permits
                .clone()
                .try_acquire_owned()
                .expect("a free permit: only this loop takes them");
            self.tasks
                .spawn(self.clone().attempt(due, permit, shutdown.clone()));
        }
    }

    /// How long the loop waits before its next look.
    fn wait_for(&self, next: NextDue) -> Duration {
        match next {
            // Never spin: a row due now that a claim missed is re-checked shortly.
            NextDue::Now => Duration::from_millis(5),
            NextDue::In(wait) => wait.max(Duration::from_millis(5)),
            NextDue::Nothing | NextDue::Unknown => self.config.poll_interval,
        }
    }

    /// When the next delivery can be claimed, as the database says (a read).
    async fn next_due(&self, free: usize) -> NextDue {
        let full = self.full_receivers(free);
        let next = match callbacks::next_due(&self.db.readers, &full, &db::now()).await {
            Ok(Some(next)) => next,
            Ok(None) => return NextDue::Nothing,
            Err(_) => return NextDue::Unknown,
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(&next) else {
            return NextDue::Unknown;
        };
        match (at.to_utc() - chrono::Utc::now()).to_std() {
            Ok(wait) if !wait.is_zero() => NextDue::In(wait),
            _ => NextDue::Now,
        }
    }

    /// Leases up to `limit` due deliveries.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Due>, db::WriteError> {
        let owner = self.config.owner.clone();
        // Long enough for the attempt and its record; a crash frees it when it expires.
        let lease = self.config.timeout + Duration::from_secs(30);
        let full = self.full_receivers(limit);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .writer
            .write_one(move |c| {
                Box::pin(async move {
                    let now = chrono::Utc::now();
                    let until = db::timestamp(now + lease);
                    let now = db::timestamp(now);
                    callbacks::claim_due(c, &owner, &now, &until, limit, &full).await
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(execution_id = %due.execution_id, webhook_id = %due.id, attempt = due.attempts + 1))]
    async fn attempt(
        self: Arc<Self>,
        mut due: Due,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let number = due.attempts + 1;
        // Sent as it is, not copied: an attempt holds its payload once.
        let body = axum::body::Bytes::from(std::mem::take(&mut due.payload));
        let started_at = db::now();
        let started = Instant::now();
        // Stopping: an attempt in flight has a little while to end and be
        // recorded (a receiver that answered would otherwise get the same
        // delivery again after the restart); past that it is dropped
        // unrecorded, its lease freed at the next start and the delivery
        // retried then.
        let grace = self.config.timeout.min(STOP_GRACE);
        let result = tokio::select! {
            result = self.post(&due, body) => result,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                self.landed(&due.url);
                return;
            }
        };
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        let next = match result.outcome {
            "delivered" => None,
            _ => {
                let attempt = u32::try_from(number).unwrap_or(u32::MAX);
                self.config
                    .schedule
                    .next_delay(attempt, result.retry_after, rand::random::<f64>())
            }
        };
        let new_status = match (result.outcome, next) {
            ("delivered", _) => "delivered",
            (_, Some(_)) => "failed",
            (_, None) => "dead",
        };
        let next_attempt_at = next.map(|d| db::timestamp(chrono::Utc::now() + d));
        let metrics = crate::metrics::get();
        metrics
            .callback_attempts
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: result.outcome.to_string(),
            })
            .inc();
        if new_status == "delivered" {
            if let Some(secs) = crate::domain::seconds_between(Some(&due.created_at), None) {
                metrics.callback_delivery_seconds.observe(secs);
            }
        }
        tracing::info!(
            outcome = result.outcome,
            http_status = ?result.http_status,
            duration_ms,
            status = new_status,
            next_attempt_at = ?next_attempt_at,
            "callback attempt"
        );
        let record = Attempt {
            callback_id: due.id.clone(),
            attempt: number,
            started_at,
            duration_ms,
            http_status: result.http_status,
            outcome: result.outcome,
            error: result.error,
            response_body: result.body,
            new_status,
            next_attempt_at,
            now: db::now(),
        };
        // Its retry is claimed when due (recorded first: its lease is free).
        if let Some(Some(next)) = self.record(record, &shutdown).await {
            let wait = chrono::DateTime::parse_from_rfc3339(&next)
                .ok()
                .and_then(|at| (at.to_utc() - chrono::Utc::now()).to_std().ok())
                .unwrap_or_default();
            self.claim_by(Instant::now() + wait);
        }
        self.landed(&due.url);
        drop(permit);
        self.wake.notify_one();
    }

    /// Records an attempt, trying again while the write fails: the row stays
    /// held until then (a lease frees nothing by itself), so a failed write
    /// given up on would leave it undelivered until the next start. Gives the
    /// next attempt's due time (`None` when the attempt was not recorded).
    async fn record(
        &self,
        record: Attempt,
        shutdown: &CancellationToken,
    ) -> Option<Option<String>> {
        let mut pause = Duration::from_millis(100);
        loop {
            let owner = self.config.owner.clone();
            let record = record.clone();
            let written = self
                .db
                .writer
                .write(move |c| {
                    Box::pin(async move { callbacks::record_attempt(c, &owner, &record).await })
                })
                .await;
            match written {
                Ok(Recorded::Next(next)) => return Some(next),
                Ok(Recorded::NotHeld) => {
                    tracing::warn!("attempt not recorded: the lease was lost");
                    return None;
                }
                Err(e) => tracing::error!(error = %e, "attempt not recorded; trying again"),
            }
            // Stopping: the next start frees the lease, and the delivery is retried.
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// One signed POST, classified.
    async fn post(&self, due: &Due, body: axum::body::Bytes) -> PostResult {
        let timestamp = chrono::Utc::now().timestamp();
        let headers = match build_headers(due, &body, timestamp) {
            Ok(headers) => headers,
            Err(error) => return PostResult::failed("request", error),
        };
        let sent = self
            .client
            .post(&due.url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return PostResult::from_error(&e),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| schedule::parse_retry_after(v, chrono::Utc::now()))
            .filter(|_| matches!(status.as_u16(), 429 | 503));
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_some(response).await;
        let code = Some(i64::from(status.as_u16()));
        let (outcome, error) = if status.is_success() {
            ("delivered", None)
        } else if status.is_redirection() {
            let to = location.unwrap_or_else(|| "nowhere".into());
            (
                "redirect",
                Some(format!(
                    "HTTP {status}: redirects are not followed (to {to})"
                )),
            )
        } else {
            ("http_status", Some(format!("HTTP {status}")))
        };
        PostResult {
            outcome,
            http_status: code,
            error,
            body,
            retry_after,
        }
    }
}

/// The headers of one attempt: the caller's, then ours (which the caller
/// cannot replace: submissions naming them are refused).
fn build_headers(due: &Due, body: &[u8], timestamp: i64) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let custom: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&due.headers).map_err(|e| format!("stored callback headers: {e}"))?;
    for (name, value) in custom {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        let value = HeaderValue::from_str(&value).map_err(|e| format!("header {name}: {e}"))?;
        headers.insert(name, value);
    }
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        headers.insert(
            name,
            HeaderValue::from_str(&value).expect("ASCII header value"),
        );
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Ours unless the caller gave one: each `callback_headers` entry is sent.
    headers
        .entry(USER_AGENT)
        .or_insert(HeaderValue::from_static(concat!(
            "execd/",
            env!("CARGO_PKG_VERSION")
        )));
    set(&mut headers, "x-hopx-timestamp", timestamp.to_string());
    // The receiver's idempotency key, signed or not.
    set(&mut headers, "webhook-id", due.id.clone());
    if let Some(secret) = &due.secret {
        set(
            &mut headers,
            "x-hopx-signature",
            sign::hopx_signature(secret, body),
        );
        set(&mut headers, "webhook-timestamp", timestamp.to_string());
        set(
            &mut headers,
            "webhook-signature",
            sign::standard_signature(secret, &due.id, timestamp, body),
        );
    }
    Ok(headers)
}

/// The first few KiB of a response body, as text.
async fn read_some(mut response: reqwest::Response) -> Option<String> {
    let mut kept = Vec::new();
    while kept.len() < RESPONSE_KEEP {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
            _ => break,
        }
    }
    kept.truncate(RESPONSE_KEEP);
    (!kept.is_empty()).then(|| String::from_utf8_lossy(&kept).into_owned())
}

/// How one POST went.
struct PostResult {
    /// delivered | redirect | http_status | timeout | connect | dns | request
    outcome: &'static str,
    http_status: Option<i64>,
    error: Option<String>,
    body: Option<String>,
    retry_after: Option<Duration>,
}

impl PostResult {
    fn failed(outcome: &'static str, error: String) -> PostResult {
        PostResult {
            outcome,
            http_status: None,
            error: Some(error),
            body: None,
            retry_after: None,
        }
    }

    fn from_error(e: &reqwest::Error) -> PostResult {
        // The whole chain, e.g. "error sending request: dns error: failed to lookup address".
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        let outcome = if e.is_timeout() {
            "timeout"
        } else if text.contains("dns error") || text.contains("failed to lookup address") {
            "dns"
        } else if e.is_connect() {
            "connect"
        } else {
            "request"
        };
        PostResult::failed(outcome, text)
    }
}

#[cfg(test)]
mod tests {
    use super::{origin, Due, Waiting};

    fn due(id: &str, url: &str) -> Due {
        Due {
            id: id.into(),
            execution_id: id.into(),
            url: url.into(),
            headers: "{}".into(),
            payload: "{}".into(),
            attempts: 0,
            secret: None,
            created_at: "t".into(),
        }
    }

    #[test]
    fn receivers_with_deliveries_waiting_take_turns_and_a_full_one_is_passed_over() {
        let mut waiting = Waiting::default();
        for (id, url) in [
            ("a1", "http://a/x"),
            ("a2", "http://a/y"),
            ("a3", "http://a/"),
            ("b1", "http://b/"),
        ] {
            waiting.push(due(id, url));
        }
        assert_eq!(waiting.bytes, 8);
        assert_eq!(waiting.held("http://a/"), 3);
        let a_full = |r: &str| r == "http://a/";
        assert_eq!(waiting.pop(a_full).unwrap().id, "b1");
        assert!(waiting.pop(a_full).is_none());
        let order: Vec<String> = std::iter::from_fn(|| waiting.pop(|_| false))
            .map(|d| d.id)
            .collect();
        assert_eq!(order, ["a1", "a2", "a3"]);
        assert_eq!(waiting.bytes, 0);
        for (id, url) in [
            ("a1", "http://a/"),
            ("a2", "http://a/"),
            ("b1", "http://b/"),
        ] {
            waiting.push(due(id, url));
        }
        let order: Vec<String> = std::iter::from_fn(|| waiting.pop(|_| false))
            .map(|d| d.id)
            .collect();
        assert_eq!(order, ["a1", "b1", "a2"], "in turns");
    }

    #[test]
    fn a_receiver_is_its_urls_scheme_host_and_port() {
        assert_eq!(
            origin("http://127.0.0.1:17151/x?y=1"),
            "http://127.0.0.1:17151/"
        );
        assert_eq!(origin("https://example.com/a/b"), "https://example.com/");
        assert_eq!(origin("http://[::1]:8080/hook"), "http://[::1]:8080/");
        // Port 1 is not a prefix of port 10.
        assert!(!"http://a.test:10/".starts_with(&origin("http://a.test:1/")));
        assert_eq!(origin("not a url"), "not a url");
    }
}
