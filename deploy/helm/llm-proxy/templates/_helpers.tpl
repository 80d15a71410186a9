{{/* Names, labels and the checks that refuse a values set the proxy cannot run. */}}

{{- define "llm-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.fullname" -}}
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

{{- define "llm-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-proxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret with the proxy's own secrets. */}}
{{- define "llm-proxy.secretName" -}}
{{- default (include "llm-proxy.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The ConfigMap with the allowlist file, or "" when the built-in one serves. */}}
{{- define "llm-proxy.allowlistConfigMap" -}}
{{- if .Values.allowlist.existingConfigMap }}
{{- .Values.allowlist.existingConfigMap }}
{{- else if .Values.allowlist.content }}
{{- printf "%s-allowlist" (include "llm-proxy.fullname" .) }}
{{- end }}
{{- end }}

{{- define "llm-proxy.isPostgres" -}}
{{- if or (hasPrefix "postgres://" .Values.database.url) (hasPrefix "postgresql://" .Values.database.url) }}true{{ end }}
{{- end }}

{{/* More than one pod: several replicas, or as many as the autoscaler decides. */}}
{{- define "llm-proxy.severalPods" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{- define "llm-proxy.validate" -}}
{{- $url := .Values.database.url }}
{{- $several := include "llm-proxy.severalPods" . }}
{{- $pods := printf "replicaCount=%d" (int .Values.replicaCount) }}
{{- if .Values.autoscaling.enabled }}{{ $pods = "autoscaling.enabled=true" }}{{ end }}
{{- if and $url (not (hasPrefix "sqlite:///" $url)) (not (include "llm-proxy.isPostgres" .)) }}
{{- fail (printf "database.url must be postgresql://user@host:5432/db or sqlite:///path.db, got %q" $url) }}
{{- end }}
{{- if and $several (not (include "llm-proxy.isPostgres" .)) }}
{{- fail (printf "database.url must be a PostgreSQL URL (postgresql://user@host:5432/db) with %s: SQLite is one file on one pod's volume, which other pods cannot share (got %q)" $pods (default "SQLite, the default" $url)) }}
{{- end }}
{{- if and $several (not .Values.redis.url) }}
{{- fail (printf "redis.url is required with %s: without Redis rate_limit_per_hour and max_requests hold per pod, not for the fleet" $pods) }}
{{- end }}
{{- if and (gt (int .Values.workers) 1) (not .Values.redis.url) }}
{{- fail (printf "redis.url is required with workers=%d: the proxy refuses WORKERS > 1 without REDIS_URL" (int .Values.workers)) }}
{{- end }}
{{- if and (or $several (gt (int .Values.workers) 1)) (or .Values.env.ADMIN_USER .Values.env.ADMIN_PASSWORD) }}
{{- fail "env.ADMIN_USER and env.ADMIN_PASSWORD need one pod of one worker: the admin pages keep their CSRF secret and the one-time display of a new token in one process" }}
{{- end }}
{{- if and (include "llm-proxy.isPostgres" .) (not .Values.secrets.encryptionKeyKey) }}
{{- fail "secrets.encryptionKeyKey must name the Secret key of ENCRYPTION_KEY: the proxy requires one with PostgreSQL" }}
{{- end }}
{{- if not .Values.secrets.managementTokenKey }}
{{- fail "secrets.managementTokenKey must name the Secret key of MANAGEMENT_TOKEN" }}
{{- end }}
{{- end }}
