//! The REST call itself: one request with the caller's key, never retried, and
//! Evolution's answer kept as it wrote it.

use std::time::Instant;

use serde_json::value::RawValue;

use super::Upstream;
use super::error::{AckReply, Error};
use super::plan::Plan;
use crate::envelope::InstanceName;
use crate::telemetry::names;

impl Upstream {
    pub(super) async fn call(
        &self,
        plan: Plan,
        instance: &InstanceName,
        key: &str,
    ) -> Result<AckReply, Error> {
        let url = format!("{}{}", self.base_url, plan.path_and_query);
        let mut request = self
            .http
            .request(plan.method.clone(), &url)
            .header("apikey", key);
        if let Some(body) = plan.body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let route = plan.route.as_str();

        let started = Instant::now();
        let outcome = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.bytes().await?))
        }
        .await;
        let label = route.to_owned();
        metrics::histogram!(names::UPSTREAM_SECONDS, "route" => label.clone())
            .record(started.elapsed().as_secs_f64());
        let (status, body) = match outcome {
            Ok(answer) => answer,
            Err(err) => {
                let err = failure(&err, instance, route);
                let status = err.status().to_string();
                metrics::counter!(names::UPSTREAM_CALLS, "route" => label, "status" => status)
                    .increment(1);
                return Err(err);
            }
        };
        metrics::counter!(names::UPSTREAM_CALLS, "route" => label, "status" => status.to_string())
            .increment(1);
        tracing::debug!(
            instance = %instance,
            route = %route,
            upstream_status = status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "emit forwarded"
        );
        Ok(AckReply::Upstream {
            status,
            body: raw_body(&body),
        })
    }
}

/// Evolution's answer as it wrote it: JSON passes through byte for byte; anything else
/// becomes a JSON string of its text.
fn raw_body(body: &[u8]) -> Box<RawValue> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text.trim()).ok())
        .map(RawValue::to_owned)
        .unwrap_or_else(|| {
            let text = serde_json::to_string(&String::from_utf8_lossy(body))
                .unwrap_or_else(|_| "null".to_owned());
            RawValue::from_string(text).unwrap_or_else(|_| null_raw())
        })
}

fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

fn failure(err: &reqwest::Error, instance: &InstanceName, route: &str) -> Error {
    tracing::warn!(instance = %instance, route = %route, error = %err, "emit call failed");
    if err.is_timeout() {
        Error::Timeout
    } else {
        Error::Unreachable
    }
}
