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
{{- if and .Values.redis.hosts .Values.redis.password (not .Values.redis.passwordSecret.name) }}
{{- $_ := set $data "redis-password" (include "hub.urlEncode" .Values.redis.password) }}
{{- end }}
{{- if and .Values.redis.hosts .Values.redis.sentinelPassword (not .Values.redis.sentinelPasswordSecret.name) }}
{{- $_ := set $data "redis-sentinel-password" (include "hub.urlEncode" .Values.redis.sentinelPassword) }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/* Redis ------------------------------------------------------------------------------- */}}

{{- define "hub.hasRedis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.hosts }}true{{ end }}
{{- end }}

{{/* Percent-encoding for a URL's user, path or query: urlquery, with a space as %20 (the hub
decodes %XX everywhere, "+" only in the query). */}}
{{- define "hub.urlEncode" -}}
{{- . | toString | urlquery | replace "+" "%20" }}
{{- end }}

{{- define "hub.redisHasPassword" -}}
{{- if or .Values.redis.password .Values.redis.passwordSecret.name }}true{{ end }}
{{- end }}

{{- define "hub.redisHasSentinelPassword" -}}
{{- if or .Values.redis.sentinelPassword .Values.redis.sentinelPasswordSecret.name }}true{{ end }}
{{- end }}

{{/*
HUB_REDIS_URL built from redis.mode and redis.hosts (PROTOCOL §6):
  server    redis://[user:password@]host:port/db
  cluster   redis+cluster://[user:password@]host:port,host:port
  sentinel  redis+sentinel://[user:password@]host:port,host:port/MASTER/db[?sentinel_password=...]
(rediss... with redis.tls). The passwords are $(REDIS_PASSWORD) and $(REDIS_SENTINEL_PASSWORD):
the kubelet puts them in from the variables before HUB_REDIS_URL, which come from Secrets, so
no password is in the pod spec. Everything else is percent-encoded here, so the only "$" in the
result starts one of those two references.
*/}}
{{- define "hub.redisUrl" -}}
{{- $r := .Values.redis }}
{{- $scheme := ternary "rediss" "redis" (eq (toString $r.tls) "true") }}
{{- if ne $r.mode "server" }}
{{- $scheme = printf "%s+%s" $scheme $r.mode }}
{{- end }}
{{- $auth := "" }}
{{- if include "hub.redisHasPassword" . }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" (include "hub.urlEncode" $r.username) }}
{{- else if $r.username }}
{{- /* "user:" and no password: without the colon the hub would read the user as a password */}}
{{- $auth = printf "%s:@" (include "hub.urlEncode" $r.username) }}
{{- end }}
{{- $path := "" }}
{{- if eq $r.mode "server" }}
{{- $path = printf "/%d" (int $r.db) }}
{{- else if eq $r.mode "sentinel" }}
{{- $path = printf "/%s/%d" (include "hub.urlEncode" $r.sentinelMaster) (int $r.db) }}
{{- end }}
{{- $query := list }}
{{- range $name, $value := $r.options }}
{{- $query = append $query (printf "%s=%s" $name (include "hub.urlEncode" $value)) }}
{{- end }}
{{- if and (eq $r.mode "sentinel") (include "hub.redisHasSentinelPassword" .) }}
{{- $query = append $query "sentinel_password=$(REDIS_SENTINEL_PASSWORD)" }}
{{- end }}
{{- printf "%s://%s%s%s" $scheme $auth (join "," $r.hosts) $path }}
{{- if $query }}?{{ join "&" $query }}{{ end }}
{{- end }}

{{/* One line on where the broker is, for NOTES.txt. */}}
{{- define "hub.brokerSummary" -}}
{{- $r := .Values.redis }}
{{- if $r.hosts }}
{{- if eq $r.mode "cluster" }}Redis Cluster, seeds {{ join ", " $r.hosts }}
{{- else if eq $r.mode "sentinel" }}Redis master "{{ $r.sentinelMaster }}" named by the Sentinels {{ join ", " $r.hosts }}
{{- else }}Redis server {{ first $r.hosts }}
{{- end }}
{{- if $r.tls }}, TLS{{ end }}
{{- else if $r.existingSecret }}Redis, HUB_REDIS_URL from Secret {{ $r.existingSecret }} key {{ $r.existingSecretKey }}
{{- else if $r.url }}Redis, HUB_REDIS_URL from redis.url
{{- else }}in-process, single node
{{- end }}
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
{{- fail "more than one hub pod needs Redis: set redis.hosts, redis.url or redis.existingSecret (nodes share nothing but the broker), or replicaCount: 1" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- include "hub.validateRedis" . }}
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

{{- define "hub.validateRedis" -}}
{{- $r := .Values.redis }}
{{- if $r.hosts }}
{{- if or $r.url $r.existingSecret }}
{{- fail "redis.hosts builds HUB_REDIS_URL: leave redis.url and redis.existingSecret empty, or drop redis.hosts" }}
{{- end }}
{{- if and (eq $r.mode "server") (gt (len $r.hosts) 1) }}
{{- fail "redis.mode=server takes one host in redis.hosts; several are Cluster seeds (redis.mode: cluster) or Sentinels (redis.mode: sentinel)" }}
{{- end }}
{{- if and (eq $r.mode "cluster") (ne (int $r.db) 0) }}
{{- fail "redis.db: a Redis Cluster has only database 0" }}
{{- end }}
{{- else }}
{{- if ne $r.mode "server" }}
{{- fail (printf "redis.mode=%s needs redis.hosts; with redis.url or redis.existingSecret the URL's scheme says which form (redis+cluster://, redis+sentinel://)" $r.mode) }}
{{- end }}
{{- if or $r.username $r.password $r.passwordSecret.name $r.sentinelPassword $r.sentinelPasswordSecret.name $r.tls $r.options (ne (int $r.db) 0) }}
{{- fail "redis.username, password, passwordSecret, sentinelPassword, sentinelPasswordSecret, tls, db and options make up the URL built from redis.hosts: set redis.hosts, or write them into redis.url" }}
{{- end }}
{{- end }}
{{- if and $r.password $r.passwordSecret.name }}
{{- fail "set redis.password or redis.passwordSecret.name, not both" }}
{{- end }}
{{- if and $r.sentinelPassword $r.sentinelPasswordSecret.name }}
{{- fail "set redis.sentinelPassword or redis.sentinelPasswordSecret.name, not both" }}
{{- end }}
{{- if and (include "hub.redisHasSentinelPassword" .) (ne $r.mode "sentinel") }}
{{- fail "redis.sentinelPassword and redis.sentinelPasswordSecret are the Sentinels' own password: for redis.mode: sentinel only" }}
{{- end }}
{{- end }}
