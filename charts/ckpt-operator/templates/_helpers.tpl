{{/* Chart name, truncated to 63 characters. */}}
{{- define "ckpt-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, or release-chart when they differ. */}}
{{- define "ckpt-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ckpt-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "ckpt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ckpt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "ckpt-operator.labels" -}}
helm.sh/chart: {{ include "ckpt-operator.chart" . }}
{{ include "ckpt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ckpt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ckpt-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Rules on namespaced objects: exactly what the operator does with them. */}}
{{- define "ckpt-operator.namespacedRules" -}}
- apiGroups: ["ckpt.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["ckpt.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["get", "patch"]
# pods carry blockOwnerDeletion: where OwnerReferencesPermissionEnforcement is on, creating them needs this
- apiGroups: ["ckpt.dev"]
  resources: ["trainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# the headless Service of a multi-node job (spec.workers > 1); owned by the job, removed with it
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# Events; a repeat raises the count of the one already posted (patch)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.kueue.enabled }}
# a queued job's one Workload: created, its spec.active and annotations patched, Kueue's finalizer removed (a
# conditional patch on the watched list: no get); deleted only when a finished job is resumed (Kueue never admits a
# Finished Workload again)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# its PodsReady and Finished conditions, and the quota given back after an eviction
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
{{- end }}
{{- end }}

{{/* The notice taints as the operator reads them: key=seconds,key=seconds (sorted by key). */}}
{{- define "ckpt-operator.noticeTaints" -}}
{{- $items := list -}}
{{- range $key, $seconds := .Values.interruptionNotices.taints -}}
{{- $items = append $items (printf "%s=%v" $key $seconds) -}}
{{- end -}}
{{- join "," $items -}}
{{- end -}}
