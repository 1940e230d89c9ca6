{{/* Names, labels and the server's command line, shared by every template. */}}

{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The resource name of a model group: "<fullname>-<group>". Call with (dict "root" $ "group" $group). */}}
{{- define "kiln.groupName" -}}
{{- printf "%s-%s" (include "kiln.fullname" .root) .group.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of a group's pods (CPU and GPU alike, so one Service reaches both). */}}
{{- define "kiln.groupSelector" -}}
app.kubernetes.io/name: {{ include "kiln.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
kiln.dev/group: {{ .group.name }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kiln.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "kiln.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "kiln.claimName" -}}
{{- default (printf "%s-models" (include "kiln.fullname" .)) .Values.plans.pvc.claimName }}
{{- end }}

{{/* Directory the server reads plans from. */}}
{{- define "kiln.planDir" -}}
{{- if eq .Values.plans.source "image" }}{{ .Values.plans.imagePath }}
{{- else if eq .Values.plans.source "compile" }}/plans
{{- else }}{{ .Values.plans.mountPath }}
{{- end }}
{{- end }}

{{/* A model's plan file: its `plan`, or "<name>.plan" when compiled at start. Call with (dict "root" $ "model" $m). */}}
{{- define "kiln.planPath" -}}
{{- if eq .root.Values.plans.source "compile" }}
{{- printf "%s/%s.plan" (include "kiln.planDir" .root) .model.name }}
{{- else }}
{{- printf "%s/%s" (include "kiln.planDir" .root) (required (printf "model %s needs a plan file" .model.name) .model.plan) }}
{{- end }}
{{- end }}

{{/*
`kiln serve` arguments of a group, one per line as a YAML list: every flag is one that `kiln serve --help`
documents (a test compares them). Call with (dict "root" $ "group" $group).
*/}}
{{- define "kiln.serveArgs" -}}
{{- $v := .root.Values -}}
- serve
- --host
- "0.0.0.0"
- --port
- {{ $v.server.port | quote }}
- --metrics-port
- {{ $v.server.metricsPort | quote }}
- --log-format
- {{ $v.server.logFormat }}
- --ctx
- {{ $v.server.ctx | quote }}
- --threads
- {{ $v.server.threads | quote }}
- --max-running
- {{ $v.server.maxRunning | quote }}
- --kv-cache-tokens
- {{ $v.server.kvCacheTokens | int64 | quote }}
- --max-waiting
- {{ $v.server.maxWaiting | quote }}
- --max-body-bytes
- {{ $v.server.maxBodyBytes | int64 | quote }}
- --request-timeout
- {{ $v.server.requestTimeout | quote }}
- --device
- {{ .device }}
{{- range .group.models }}
- --model
- {{ printf "%s=%s" .name (include "kiln.planPath" (dict "root" $.root "model" .)) }}
{{- end }}
{{- range $alias, $model := .group.aliases }}
- --alias
- {{ printf "%s=%s" $alias $model }}
{{- end }}
{{- if $v.apiKeys.enabled }}
- --api-key-file
- /etc/kiln/api-keys/{{ $v.apiKeys.secretKey }}
{{- end }}
{{- range $v.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "kiln.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
