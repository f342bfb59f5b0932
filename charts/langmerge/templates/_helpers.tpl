{{/*
Shared helpers: names, labels, images. Component helpers live next to their templates
(operator/_env.tpl, rbac/_rules.tpl).
*/}}

{{- define "langmerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "langmerge.fullname" -}}
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

{{- define "langmerge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "langmerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "langmerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "langmerge.labels" -}}
helm.sh/chart: {{ include "langmerge.chart" . }}
{{ include "langmerge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: langmerge
{{/* Not "langmerge": that value marks the Jobs the operator creates (and watches). */ -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "langmerge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "langmerge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "langmerge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "langmerge.trainerImage" -}}
{{- printf "%s:%s" .Values.jobs.trainerImage.repository (default .Chart.AppVersion .Values.jobs.trainerImage.tag) }}
{{- end }}

{{/* True (non-empty) when the operator watches the whole cluster. */}}
{{- define "langmerge.clusterwide" -}}
{{- if not .Values.watch.namespaces }}true{{ end }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "langmerge.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: without it every replica would reconcile" }}
{{- end }}
{{- if ne (len .Values.watch.namespaces) (len (uniq .Values.watch.namespaces)) }}
{{- fail "watch.namespaces lists a namespace twice" }}
{{- end }}
{{- range $k, $v := .Values.jobs.env }}
{{- if contains "," (toString $v) }}
{{- fail (printf "jobs.env.%s: values must not contain commas (LANGMERGE_JOB_ENV is a comma-separated K=V list)" $k) }}
{{- end }}
{{- end }}
{{- end }}
