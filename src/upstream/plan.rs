//! The pure part of an emit: what REST call an event and its argument make.

use serde_json::value::RawValue;

use super::error::Error;
use super::routes::{RouteTable, SEND_MESSAGE_ALIAS, encode_query};
use crate::envelope::InstanceName;
use crate::json_object;

/// One emit, ready to send: what [`plan`] makes of an event and its argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub method: http::Method,
    /// `/message/sendText/acme%20support`, with `?query` for GET routes.
    pub path_and_query: String,
    /// The JSON body (not for GET).
    pub body: Option<String>,
    /// Stripped from the argument: the idempotency key.
    pub request_id: Option<String>,
    /// The route's template, for metrics and logs.
    pub route: String,
}

/// The most top-level fields an emit's argument may have (Evolution's bodies have a few).
pub const MAX_ARGUMENT_FIELDS: usize = 1024;

/// The longest `requestId` accepted (a UUID is 36 bytes).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Maps an emit to its REST call, for `instance` only. Pure, so it can be fuzzed: every
/// input gives a plan or the ack that refuses it.
///
/// The argument is read one level deep: `requestId` is taken out (and `message` renamed
/// `text` for the `send_message` alias); every other field goes to Evolution as the
/// client wrote it, in its order.
pub fn plan(
    routes: &RouteTable,
    instance: &InstanceName,
    event: &str,
    argument: Option<&RawValue>,
) -> Result<Plan, Error> {
    let Some(route) = routes.get(event) else {
        return Err(Error::UnknownEvent(event.to_owned()));
    };
    let is_get = route.method == http::Method::GET;
    let mut fields = match argument.map(RawValue::get) {
        None | Some("null") if is_get => Vec::new(),
        Some(text) => match json_object::entries(text, MAX_ARGUMENT_FIELDS) {
            Ok(fields) => fields,
            Err(_) => return Err(Error::NotAnObject),
        },
        None => return Err(Error::NoArgument),
    };
    let mut request_id = None;
    let mut keep = Vec::with_capacity(fields.len());
    for (key, value) in fields.drain(..) {
        if key == "requestId" {
            let Ok(id) = serde_json::from_str::<String>(value.get()) else {
                return Err(Error::RequestIdNotString);
            };
            if id.len() > MAX_REQUEST_ID_BYTES {
                return Err(Error::RequestIdTooLong);
            }
            request_id = Some(id);
        } else {
            keep.push((key, value));
        }
    }
    if event == SEND_MESSAGE_ALIAS && !keep.iter().any(|(key, _)| key == "text") {
        for (key, _) in keep.iter_mut() {
            if key == "message" {
                *key = "text".into();
                break;
            }
        }
    }
    let mut path_and_query = route.path_for(instance);
    let body = if is_get {
        let query: Vec<String> = keep
            .iter()
            .map(|(key, value)| {
                let value = serde_json::from_str::<String>(value.get())
                    .unwrap_or_else(|_| value.get().to_owned());
                format!("{}={}", encode_query(key), encode_query(&value))
            })
            .collect();
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&query.join("&"));
        }
        None
    } else {
        Some(json_object::write(
            keep.iter().map(|(key, value)| (key.as_ref(), *value)),
        ))
    };
    Ok(Plan {
        method: route.method.clone(),
        path_and_query,
        body,
        request_id,
        route: route.template.clone(),
    })
}
