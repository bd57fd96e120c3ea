//! Request validation against Firecracker's own API description (Swagger 2.0, v1.16.1).
//!
//! The YAML is embedded unchanged, so the fake rejects exactly the shapes the published spec
//! rejects: unknown paths and methods, missing required fields, wrong JSON types, values outside
//! an `enum` or a `minimum`/`maximum`, and — because Firecracker deserialises its request
//! bodies with `deny_unknown_fields` — any property the schema does not declare.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The embedded Firecracker API description.
pub const SPEC_YAML: &str = include_str!("../spec/firecracker-api-v1.16.1.yaml");

/// Why a request does not fit the API description. Each message names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// No path template matches. The wording is the real server's.
    #[error("Invalid request method and/or path: {method} {path}.")]
    UnknownPath { method: String, path: String },
    /// The path exists but not with this method.
    #[error("Invalid request method and/or path: {method} {path}. ({template} supports {allowed})")]
    WrongMethod {
        method: String,
        path: String,
        template: String,
        allowed: String,
    },
    #[error("body: missing request body, {operation_id} requires one")]
    MissingBody { operation_id: String },
    #[error("body: {method} {path} takes no request body")]
    UnexpectedBody { method: String, path: String },
    /// The body does not fit the schema; `at` is the JSON path, e.g. `body.vcpu_count`.
    #[error("{at}: {message}")]
    Body { at: String, message: String },
}

/// Errors loading the embedded spec. They can only come from a corrupted build, but are still
/// reported instead of panicking deep inside a request.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("parsing the embedded Firecracker API spec: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("the embedded Firecracker API spec has no {0}")]
    Missing(&'static str),
    #[error("Firecracker API spec path {path}, method {method}: {reason}")]
    BadOperation {
        path: String,
        method: String,
        reason: String,
    },
}

/// The request body parameter of an operation.
#[derive(Debug, Clone)]
pub struct BodyParam {
    pub required: bool,
    pub schema: Value,
}

/// One method on one path template, e.g. `PUT /drives/{drive_id}` (`putGuestDriveByID`).
#[derive(Debug, Clone)]
pub struct Operation {
    /// Upper-case HTTP method.
    pub method: String,
    /// The path template as written in the spec.
    pub template: String,
    pub operation_id: String,
    pub body: Option<BodyParam>,
}

/// An operation matched by a concrete request, with its path parameters.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    pub operation: &'a Operation,
    /// Path parameters by name, e.g. `drive_id` → `rootfs`.
    pub params: BTreeMap<String, String>,
}

impl Matched<'_> {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
struct PathEntry {
    template: String,
    segments: Vec<Segment>,
    operations: Vec<Operation>,
}

/// The parsed API description.
#[derive(Debug, Clone)]
pub struct Spec {
    version: String,
    paths: Vec<PathEntry>,
    definitions: Map<String, Value>,
}

const METHODS: [&str; 5] = ["get", "put", "patch", "post", "delete"];

impl Spec {
    /// Parses the embedded spec. The embedded file is part of the build, so a failure here is a
    /// build defect and panics with the reason.
    pub fn load() -> Spec {
        match Spec::parse(SPEC_YAML) {
            Ok(spec) => spec,
            Err(e) => panic!("{e}"),
        }
    }

    /// Parses a Swagger 2.0 document in the shape Firecracker's spec uses.
    pub fn parse(yaml: &str) -> Result<Spec, SpecError> {
        let doc: Value = serde_norway::from_str(yaml)?;
        let version = doc
            .pointer("/info/version")
            .and_then(value_as_string)
            .ok_or(SpecError::Missing("info.version"))?;
        let definitions = doc
            .get("definitions")
            .and_then(Value::as_object)
            .cloned()
            .ok_or(SpecError::Missing("definitions"))?;
        let raw_paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or(SpecError::Missing("paths"))?;

        let mut paths = Vec::new();
        for (template, item) in raw_paths {
            let segments = split_path(template)
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Segment::Param(name.to_string()),
                        None => Segment::Literal(s.to_string()),
                    },
                )
                .collect();
            let mut operations = Vec::new();
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let bad = |reason: &str| SpecError::BadOperation {
                    path: template.clone(),
                    method: method.to_uppercase(),
                    reason: reason.to_string(),
                };
                let operation_id = op
                    .get("operationId")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("no operationId"))?
                    .to_string();
                let mut body = None;
                for param in op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if param.get("in").and_then(Value::as_str) == Some("body") {
                        let schema = param
                            .get("schema")
                            .cloned()
                            .ok_or_else(|| bad("body parameter without schema"))?;
                        let required = param
                            .get("required")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        body = Some(BodyParam { required, schema });
                    }
                }
                operations.push(Operation {
                    method: method.to_uppercase(),
                    template: template.clone(),
                    operation_id,
                    body,
                });
            }
            paths.push(PathEntry {
                template: template.clone(),
                segments,
                operations,
            });
        }
        let spec = Spec {
            version,
            paths,
            definitions,
        };
        spec.check_refs()?;
        Ok(spec)
    }

    /// The API version the spec describes, e.g. `1.16.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// All operations, for listing and tests.
    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.paths.iter().flat_map(|p| p.operations.iter())
    }

    /// A definition by name, e.g. `Drive`.
    pub fn definition(&self, name: &str) -> Option<&Value> {
        self.definitions.get(name)
    }

    /// Finds the operation for `method` and `path` (a query string is ignored) and checks `body`
    /// against its schema.
    pub fn validate(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Matched<'_>, ValidationError> {
        let matched = self.route(method, path)?;
        let op = matched.operation;
        match (&op.body, body) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(ValidationError::UnexpectedBody {
                    method: op.method.clone(),
                    path: strip_query(path).to_string(),
                });
            }
            (Some(param), None) => {
                if self.body_required(op, param) {
                    return Err(ValidationError::MissingBody {
                        operation_id: op.operation_id.clone(),
                    });
                }
            }
            (Some(param), Some(value)) => {
                let partial = partial_update(op);
                self.check(&param.schema, value, "body", partial)?;
            }
        }
        Ok(matched)
    }

    /// Matches a request line to an operation without looking at the body.
    pub fn route(&self, method: &str, path: &str) -> Result<Matched<'_>, ValidationError> {
        let path_only = strip_query(path);
        let parts: Vec<&str> = split_path(path_only).collect();
        let mut found_path = None;
        for entry in &self.paths {
            if let Some(params) = match_segments(&entry.segments, &parts) {
                found_path = Some((entry, params));
                break;
            }
        }
        let Some((entry, params)) = found_path else {
            return Err(ValidationError::UnknownPath {
                method: method.to_string(),
                path: path_only.to_string(),
            });
        };
        let Some(operation) = entry
            .operations
            .iter()
            .find(|op| op.method.eq_ignore_ascii_case(method))
        else {
            let allowed: Vec<&str> = entry.operations.iter().map(|o| o.method.as_str()).collect();
            return Err(ValidationError::WrongMethod {
                method: method.to_string(),
                path: path_only.to_string(),
                template: entry.template.clone(),
                allowed: allowed.join(", "),
            });
        };
        Ok(Matched { operation, params })
    }

    /// A body is needed when the spec marks the parameter required, or when its schema has
    /// required fields (Firecracker cannot deserialise those from nothing, e.g. PUT
    /// /machine-config, whose parameter lacks `required: true`).
    fn body_required(&self, op: &Operation, param: &BodyParam) -> bool {
        if param.required {
            return true;
        }
        if partial_update(op) {
            return false;
        }
        self.resolve(&param.schema)
            .and_then(|s| s.get("required"))
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
    }

    fn resolve<'s>(&'s self, schema: &'s Value) -> Option<&'s Value> {
        let mut current = schema;
        // Definitions may refer to other definitions; the spec has no cycles through a bare
        // `$ref`, but bound the walk anyway.
        for _ in 0..16 {
            match current.get("$ref").and_then(Value::as_str) {
                Some(r) => current = self.definitions.get(r.strip_prefix("#/definitions/")?)?,
                None => return Some(current),
            }
        }
        None
    }

    fn check_refs(&self) -> Result<(), SpecError> {
        fn walk(spec: &Spec, v: &Value) -> Result<(), SpecError> {
            match v {
                Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(Value::as_str)
                        && spec.resolve(v).is_none()
                    {
                        return Err(SpecError::BadOperation {
                            path: r.to_string(),
                            method: "-".to_string(),
                            reason: "unresolvable $ref".to_string(),
                        });
                    }
                    m.values().try_for_each(|c| walk(spec, c))
                }
                Value::Array(a) => a.iter().try_for_each(|c| walk(spec, c)),
                _ => Ok(()),
            }
        }
        for op in self.operations() {
            if let Some(b) = &op.body {
                walk(self, &b.schema)?;
            }
        }
        walk(self, &Value::Object(self.definitions.clone()))
    }

    fn check(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        partial: bool,
    ) -> Result<(), ValidationError> {
        let err = |message: String| ValidationError::Body {
            at: at.to_string(),
            message,
        };
        let Some(schema) = self.resolve(schema) else {
            return Err(err("schema reference cannot be resolved".to_string()));
        };
        let ty = schema.get("type").and_then(Value::as_str).or_else(|| {
            (schema.get("properties").is_some() || schema.get("additionalProperties").is_some())
                .then_some("object")
        });
        if let Some(ty) = ty
            && !type_matches(ty, value)
        {
            return Err(err(format!("expected {ty}, got {}", json_type(value))));
        }

        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            // The spec marks some enums (the logger level) as case-insensitive in prose, and
            // Firecracker accepts them that way.
            let case_insensitive = schema
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains("case-insensitive"));
            let ok = allowed.iter().any(|a| match (a, value) {
                (Value::String(a), Value::String(v)) if case_insensitive => {
                    a.eq_ignore_ascii_case(v)
                }
                (a, v) => a == v,
            });
            if !ok {
                let names: Vec<String> = allowed.iter().map(enum_display).collect();
                return Err(err(format!("{} is not one of {}", value, names.join(", "))));
            }
        }

        if let Some(n) = value.as_number() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n.as_f64().is_some_and(|v| v < min)
            {
                return Err(err(format!(
                    "{n} is less than the minimum {}",
                    fmt_num(min)
                )));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n.as_f64().is_some_and(|v| v > max)
            {
                return Err(err(format!(
                    "{n} is greater than the maximum {}",
                    fmt_num(max)
                )));
            }
        }

        match value {
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"), false)?;
                    }
                }
            }
            Value::Object(fields) if ty == Some("object") => {
                let empty = Map::new();
                let props = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                if !partial {
                    for name in schema
                        .get("required")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                    {
                        if !fields.contains_key(name) {
                            return Err(err(format!("missing required field \"{name}\"")));
                        }
                    }
                }
                let extra = schema.get("additionalProperties");
                for (name, field) in fields {
                    let child_at = format!("{at}.{name}");
                    match props.get(name) {
                        Some(prop) => {
                            // serde reads `null` as `None` for optional fields, so Firecracker
                            // accepts it there; a required field must have a real value.
                            let required = schema
                                .get("required")
                                .and_then(Value::as_array)
                                .is_some_and(|r| r.iter().any(|x| x == name));
                            if field.is_null() && (!required || partial) {
                                continue;
                            }
                            self.check(prop, field, &child_at, false)?;
                        }
                        None => match extra {
                            Some(Value::Bool(true)) => {}
                            Some(extra_schema @ Value::Object(_)) => {
                                self.check(extra_schema, field, &child_at, false)?;
                            }
                            _ => return Err(err(format!("unknown field \"{name}\""))),
                        },
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Operations whose body is a partial update in Firecracker even though the spec reuses the
/// full schema: PATCH /machine-config takes `MachineConfigUpdate`, where every field is optional.
fn partial_update(op: &Operation) -> bool {
    op.operation_id == "patchMachineConfiguration"
}

fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn split_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn match_segments(template: &[Segment], parts: &[&str]) -> Option<BTreeMap<String, String>> {
    if template.len() != parts.len() {
        return None;
    }
    let mut params = BTreeMap::new();
    for (seg, part) in template.iter().zip(parts) {
        match seg {
            Segment::Literal(l) if l == part => {}
            Segment::Literal(_) => return None,
            Segment::Param(name) => {
                params.insert(name.clone(), (*part).to_string());
            }
        }
    }
    Some(params)
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        // A type this validator does not know is not grounds for rejecting input.
        _ => true,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn enum_display(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

fn value_as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Spec {
        Spec::load()
    }

    fn ok(method: &str, path: &str, body: Value) -> String {
        let spec = spec();
        match spec.validate(method, path, Some(&body)) {
            Ok(m) => m.operation.operation_id.clone(),
            Err(e) => panic!("{method} {path} {body} rejected: {e}"),
        }
    }

    fn rejected(method: &str, path: &str, body: Option<Value>) -> String {
        let spec = spec();
        match spec.validate(method, path, body.as_ref()) {
            Ok(m) => panic!("{method} {path} accepted as {}", m.operation.operation_id),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_embedded_spec() {
        let spec = spec();
        assert_eq!(spec.version(), "1.16.1");
        assert!(spec.definition("Drive").is_some());
        let ids: Vec<&str> = spec.operations().map(|o| o.operation_id.as_str()).collect();
        for id in [
            "describeInstance",
            "createSyncAction",
            "putGuestBootSource",
            "putGuestDriveByID",
            "putGuestNetworkInterfaceByID",
            "putGuestVsock",
            "patchVm",
            "createSnapshot",
            "loadSnapshot",
            "getExportVmConfig",
        ] {
            assert!(ids.contains(&id), "{id} missing from {ids:?}");
        }
    }

    #[test]
    fn accepts_valid_bodies() {
        assert_eq!(
            ok(
                "PUT",
                "/boot-source",
                json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"})
            ),
            "putGuestBootSource"
        );
        assert_eq!(
            ok(
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "huge_pages": "None"})
            ),
            "putMachineConfiguration"
        );
        assert_eq!(
            ok(
                "PUT",
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                       "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync",
                       "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 100}}})
            ),
            "putGuestDriveByID"
        );
        assert_eq!(
            ok(
                "PUT",
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"})
            ),
            "putGuestNetworkInterfaceByID"
        );
        assert_eq!(
            ok(
                "PUT",
                "/vsock",
                json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})
            ),
            "putGuestVsock"
        );
        assert_eq!(
            ok("PUT", "/actions", json!({"action_type": "InstanceStart"})),
            "createSyncAction"
        );
        assert_eq!(ok("PATCH", "/vm", json!({"state": "Paused"})), "patchVm");
        assert_eq!(ok("PATCH", "/vm", json!({"state": "Resumed"})), "patchVm");
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/create",
                json!({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Full"})
            ),
            "createSnapshot"
        );
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/load",
                json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                       "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]})
            ),
            "loadSnapshot"
        );
        // Logger levels are case-insensitive in Firecracker.
        assert_eq!(ok("PUT", "/logger", json!({"level": "debug"})), "putLogger");
        // MMDS contents are free-form.
        assert_eq!(ok("PUT", "/mmds", json!({"a": {"b": [1, 2]}})), "putMmds");
        // PATCH /machine-config is a partial update.
        assert_eq!(
            ok("PATCH", "/machine-config", json!({"vcpu_count": 4})),
            "patchMachineConfiguration"
        );
        // Optional fields may be null (serde reads it as None).
        assert_eq!(
            ok(
                "PUT",
                "/boot-source",
                json!({"kernel_image_path": "/k", "initrd_path": null})
            ),
            "putGuestBootSource"
        );
    }

    #[test]
    fn accepts_bodyless_gets_and_captures_params() {
        let spec = spec();
        let m = spec.validate("GET", "/", None).unwrap();
        assert_eq!(m.operation.operation_id, "describeInstance");
        let m = spec
            .validate(
                "PUT",
                "/drives/data1",
                Some(&json!({"drive_id": "data1", "is_root_device": false})),
            )
            .unwrap();
        assert_eq!(m.param("drive_id"), Some("data1"));
        assert_eq!(m.operation.template, "/drives/{drive_id}");
        let m = spec.validate("GET", "/machine-config?x=1", None).unwrap();
        assert_eq!(m.operation.operation_id, "getMachineConfiguration");
    }

    #[test]
    fn rejects_missing_required_field() {
        let e = rejected("PUT", "/boot-source", Some(json!({"boot_args": "x"})));
        assert_eq!(e, "body: missing required field \"kernel_image_path\"");
        let e = rejected(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}})),
        );
        assert_eq!(
            e,
            "body.mem_backend: missing required field \"backend_path\""
        );
    }

    #[test]
    fn rejects_unknown_field() {
        let e = rejected(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/k", "foo": 1})),
        );
        assert_eq!(e, "body: unknown field \"foo\"");
        let e = rejected(
            "PUT",
            "/drives/r",
            Some(json!({"drive_id": "r", "is_root_device": true,
                        "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 2}}})),
        );
        assert_eq!(e, "body.rate_limiter.bandwidth: unknown field \"burst\"");
    }

    #[test]
    fn rejects_wrong_type() {
        let e = rejected(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": "2", "mem_size_mib": 128})),
        );
        assert_eq!(e, "body.vcpu_count: expected integer, got string");
        let e = rejected(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 1.5})),
        );
        assert_eq!(e, "body.mem_size_mib: expected integer, got number");
        let e = rejected(
            "PUT",
            "/snapshot/load",
            Some(
                json!({"snapshot_path": "/s", "network_overrides": [{"iface_id": 1, "host_dev_name": "t"}]}),
            ),
        );
        assert_eq!(
            e,
            "body.network_overrides[0].iface_id: expected string, got integer"
        );
        let e = rejected("PUT", "/actions", Some(json!([])));
        assert_eq!(e, "body: expected object, got array");
        let e = rejected(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": null})),
        );
        assert_eq!(e, "body.kernel_image_path: expected string, got null");
    }

    #[test]
    fn rejects_bad_enum_and_range() {
        let e = rejected("PUT", "/actions", Some(json!({"action_type": "Reboot"})));
        assert_eq!(
            e,
            "body.action_type: \"Reboot\" is not one of \"FlushMetrics\", \"InstanceStart\", \"SendCtrlAltDel\""
        );
        let e = rejected("PATCH", "/vm", Some(json!({"state": "paused"})));
        assert!(e.starts_with("body.state: \"paused\" is not one of"), "{e}");
        let e = rejected(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 33, "mem_size_mib": 128})),
        );
        assert_eq!(e, "body.vcpu_count: 33 is greater than the maximum 32");
        let e = rejected(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 0, "mem_size_mib": 128})),
        );
        assert_eq!(e, "body.vcpu_count: 0 is less than the minimum 1");
        let e = rejected(
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 2, "uds_path": "/v"})),
        );
        assert_eq!(e, "body.guest_cid: 2 is less than the minimum 3");
        let e = rejected(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T9"})),
        );
        assert!(
            e.starts_with("body.cpu_template: \"T9\" is not one of \"C3\""),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_path_and_wrong_method() {
        let e = rejected("PUT", "/bogus", Some(json!({})));
        assert_eq!(e, "Invalid request method and/or path: PUT /bogus.");
        let e = rejected("PUT", "/drives", Some(json!({})));
        assert_eq!(e, "Invalid request method and/or path: PUT /drives.");
        let e = rejected("GET", "/boot-source", None);
        assert_eq!(
            e,
            "Invalid request method and/or path: GET /boot-source. (/boot-source supports PUT)"
        );
        let e = rejected("DELETE", "/drives/rootfs", None);
        assert!(e.contains("DELETE /drives/rootfs"), "{e}");
        assert!(e.contains("supports PUT, PATCH"), "{e}");
    }

    #[test]
    fn rejects_missing_and_unexpected_body() {
        let e = rejected("PUT", "/boot-source", None);
        assert_eq!(
            e,
            "body: missing request body, putGuestBootSource requires one"
        );
        let e = rejected("PUT", "/machine-config", None);
        assert_eq!(
            e,
            "body: missing request body, putMachineConfiguration requires one"
        );
        let e = rejected("GET", "/", Some(json!({})));
        assert_eq!(e, "body: GET / takes no request body");
        // The hinting start body is optional in the spec.
        spec()
            .validate("PATCH", "/balloon/hinting/start", None)
            .unwrap();
    }
}
