// Validate Kubernetes objects against the real schemas shipped by the kubernetes-models packages
// (Kubernetes' OpenAPI definitions, and the KEDA and prometheus-operator CRDs' openAPIV3Schema).
//
//   node validate.mjs < objects.json     (a JSON array of objects, e.g. a rendered overlay)
//
// Prints one JSON line: {"checked": N, "errors": [{"index", "apiVersion", "kind", "name", "error"}]}
// and exits 1 when there is an error, including an object whose apiVersion/kind has no model
// (never passed over silently). Installed by scripts/ensure-k8s-validators.sh into .run/k8s-validate/.
import { readFileSync } from "node:fs";

// apiVersion -> the module that exports its kinds' models
function moduleFor(apiVersion) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "") return `kubernetes-models/${version}`;
  if (group === "keda.sh") return `@kubernetes-models/keda/keda.sh/${version}`;
  if (group === "monitoring.coreos.com") return `@kubernetes-models/prometheus-operator/monitoring.coreos.com/${version}`;
  return `kubernetes-models/${group}/${version}`;
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const errors = [];
for (const [index, obj] of objects.entries()) {
  const where = { index, apiVersion: obj?.apiVersion, kind: obj?.kind, name: obj?.metadata?.name };
  let mod;
  try {
    mod = await import(moduleFor(String(obj.apiVersion)));
  } catch (e) {
    errors.push({ ...where, error: `no schema for apiVersion ${obj?.apiVersion}: ${e.message}` });
    continue;
  }
  const Model = mod[obj.kind];
  if (typeof Model !== "function") {
    errors.push({ ...where, error: `no schema for kind ${obj.kind} in ${obj.apiVersion}` });
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    errors.push({ ...where, error: e.message });
  }
}
console.log(JSON.stringify({ checked: objects.length, errors }));
process.exit(errors.length ? 1 : 0);
