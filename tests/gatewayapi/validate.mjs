// Validates Gateway API objects for tests/gatewayschema.py: a JSON array of objects on
// stdin, a JSON array on stdout with one array of error strings per object ([] = valid).
// The validators are those @kubernetes-models/gateway-api ships, one module per
// (version, kind); an object with no validator is an error, never a silent pass.
import { readFileSync } from "node:fs";

const GROUP = "gateway.networking.k8s.io";

function moduleFor(doc) {
  const [group, version] = String(doc?.apiVersion ?? "").split("/");
  if (group !== GROUP || !/^v[0-9a-z]+$/.test(version ?? "") || !/^[A-Za-z]+$/.test(doc?.kind ?? "")) {
    return null;
  }
  const v = version[0].toUpperCase() + version.slice(1);
  return `@kubernetes-models/gateway-api/_schemas/IoK8sSigsGatewayApiApis${v}${doc.kind}`;
}

function describe(e) {
  const p = e.params ?? {};
  const what = {
    minimum: () => `must be ${p.comparison} ${p.limit}`,
    maximum: () => `must be ${p.comparison} ${p.limit}`,
    enum: () => `must be one of ${JSON.stringify(p.allowedValues)}`,
    pattern: () => `must match ${p.pattern}`,
    required: () => `must have ${p.missingProperty}`,
    type: () => `must be ${p.type}`,
  }[e.keyword];
  return `${e.instancePath || "/"}: ${what ? what() : `${e.keyword} ${JSON.stringify(p)}`}`;
}

const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of docs) {
  const name = moduleFor(doc);
  const validate = name && (await import(name).then(
    (m) => m.validate,
    (err) => { if (err.code === "ERR_MODULE_NOT_FOUND") return null; throw err; },
  ));
  if (!validate) {
    results.push([`no Gateway API schema for apiVersion ${doc?.apiVersion} kind ${doc?.kind}`]);
    continue;
  }
  results.push(validate(doc) ? [] : [...new Set(validate.errors.map(describe))]);
}
process.stdout.write(JSON.stringify(results));
