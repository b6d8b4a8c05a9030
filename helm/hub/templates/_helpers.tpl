{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "hub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "hub.fullname" -}}
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

{{- define "hub.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hub.labels" -}}
helm.sh/chart: {{ include "hub.chart" . }}
{{ include "hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: hub
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "hub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hub.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secrets ----------------------------------------------------------------------------- */}}

{{/* The keys the chart's own Secret holds, as a dict; empty when every secret is external. */}}
{{- define "hub.secretData" -}}
{{- $data := dict }}
{{- if and .Values.auth.jwtSecret (not .Values.auth.existingSecret) }}
{{- $_ := set $data "jwt-secret" .Values.auth.jwtSecret }}
{{- end }}
{{- if and .Values.auth.apiKey (not .Values.auth.existingSecret) }}
{{- $_ := set $data "api-key" .Values.auth.apiKey }}
{{- end }}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) }}
{{- $_ := set $data "redis-url" .Values.redis.url }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{- define "hub.hasRedis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/* Config ------------------------------------------------------------------------------ */}}

{{/* A TOML scalar: strings JSON-quoted (valid TOML basic strings), whole numbers as integers. */}}
{{- define "hub.tomlValue" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- ternary "true" "false" . }}
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{- define "hub.configToml" -}}
{{- if .Values.config.toml }}
{{- .Values.config.toml }}
{{- else -}}
# Channel namespaces (PROTOCOL §4), rendered by the hub chart from config.namespaces.
{{- range $name, $options := .Values.config.namespaces }}

[namespaces.{{ toJson $name }}]
{{- range $key, $value := $options }}
{{ $key }} = {{ include "hub.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Shutdown ---------------------------------------------------------------------------- */}}

{{/*
The pod's grace period covers the preStop sleep (it runs before SIGTERM), the drain delay, the
spread of the 1012 closes and the hub's own 5 s margin (PROTOCOL §7), plus slack.
*/}}
{{- define "hub.drainBudget" -}}
{{- add (int .Values.shutdown.preStopSleepSeconds) (int .Values.hub.drainDelay) (int .Values.hub.drainSeconds) }}
{{- end }}

{{- define "hub.terminationGracePeriodSeconds" -}}
{{- $budget := int (include "hub.drainBudget" .) }}
{{- $set := int .Values.shutdown.terminationGracePeriodSeconds }}
{{- if eq $set 0 }}
{{- add $budget 15 }}
{{- else if lt $set (add $budget 10 | int) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds=%d is too short: it must be at least shutdown.preStopSleepSeconds + hub.drainDelay + hub.drainSeconds + 10 = %d (or 0 to compute it)" $set (add $budget 10)) }}
{{- else }}
{{- $set }}
{{- end }}
{{- end }}

{{/* Checks that a schema cannot express ------------------------------------------------- */}}

{{- define "hub.validate" -}}
{{- $multi := or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}
{{- $redisFromEnv := false }}
{{- range .Values.extraEnv }}
{{- if eq .name "HUB_REDIS_URL" }}{{ $redisFromEnv = true }}{{ end }}
{{- end }}
{{- if and $multi (not (include "hub.hasRedis" .)) (not $redisFromEnv) (not .Values.extraEnvFrom) }}
{{- fail "more than one hub pod needs Redis: set redis.url or redis.existingSecret (nodes share nothing but the broker), or replicaCount: 1" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- if and .Values.auth.existingSecret (or .Values.auth.jwtSecret .Values.auth.apiKey) }}
{{- fail "auth.existingSecret is set: leave auth.jwtSecret and auth.apiKey empty (put them in that Secret)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage .Values.autoscaling.targetConnectionsPerPod)) }}
{{- fail "autoscaling.enabled needs a target: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or targetConnectionsPerPod" }}
{{- end }}
{{- $_ := include "hub.terminationGracePeriodSeconds" . }}
{{- end }}
