{{/*
The operator's environment: one LANGMERGE_<FIELD> per field of langmerge.settings.Settings that the chart sets
(tests/helm check that every name is a real field and that the operator parses the rendered values).
*/}}
{{- define "langmerge.operator.env" -}}
{{- $v := .Values }}
{{- if $v.watch.namespaces }}
- name: LANGMERGE_NAMESPACES
  value: {{ join "," $v.watch.namespaces | quote }}
{{- end }}
- name: LANGMERGE_ARTIFACTS_URI
  value: {{ required "artifactsUri is required (s3://bucket/prefix)" $v.artifactsUri | quote }}
- name: LANGMERGE_S3_ENDPOINT
  value: {{ $v.s3.endpoint | quote }}
- name: LANGMERGE_S3_REGION
  value: {{ $v.s3.region | quote }}
- name: LANGMERGE_S3_SECRET_NAME
  value: {{ $v.s3.credentials.secretName | quote }}
- name: LANGMERGE_S3_SECRET_ACCESS_KEY_ID_KEY
  value: {{ $v.s3.credentials.accessKeyIdKey | quote }}
- name: LANGMERGE_S3_SECRET_SECRET_ACCESS_KEY_KEY
  value: {{ $v.s3.credentials.secretAccessKeyKey | quote }}
- name: LANGMERGE_CHECK_S3_SECRET
  value: {{ $v.s3.credentials.checkExists | quote }}
{{- if $v.s3.credentials.operatorFromSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $v.s3.credentials.secretName | quote }}
      key: {{ $v.s3.credentials.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $v.s3.credentials.secretName | quote }}
      key: {{ $v.s3.credentials.secretAccessKeyKey | quote }}
{{- end }}
- name: LANGMERGE_TRAINER_IMAGE
  value: {{ include "langmerge.trainerImage" . | quote }}
- name: LANGMERGE_IMAGE_PULL_POLICY
  value: {{ $v.jobs.imagePullPolicy | quote }}
- name: LANGMERGE_GPU_RESOURCE_NAME
  value: {{ $v.jobs.gpuResourceName | quote }}
- name: LANGMERGE_MAX_TRAINING_JOBS
  value: {{ $v.jobs.maxTrainingJobs | int64 | quote }}
- name: LANGMERGE_MAX_MERGE_JOBS
  value: {{ $v.jobs.maxMergeJobs | int64 | quote }}
- name: LANGMERGE_MAX_TRAINING_JOBS_PER_NAMESPACE
  value: {{ $v.jobs.maxTrainingJobsPerNamespace | int64 | quote }}
- name: LANGMERGE_MAX_MERGE_JOBS_PER_NAMESPACE
  value: {{ $v.jobs.maxMergeJobsPerNamespace | int64 | quote }}
- name: LANGMERGE_MAX_JOB_CPU
  value: {{ $v.jobs.maxCpu | quote }}
- name: LANGMERGE_MAX_JOB_MEMORY
  value: {{ $v.jobs.maxMemory | quote }}
- name: LANGMERGE_ALLOWED_REGISTRIES
  value: {{ join "," $v.jobs.allowedRegistries | quote }}
- name: LANGMERGE_URI_POLICY
  value: {{ $v.tenancy.uriPolicy | quote }}
- name: LANGMERGE_NAMESPACE_PREFIX
  value: {{ $v.tenancy.namespacePrefix | quote }}
- name: LANGMERGE_URI_GRANTS
  value: {{ $v.tenancy.grants | toJson | quote }}
- name: LANGMERGE_JOB_BACKOFF_LIMIT
  value: {{ $v.jobs.backoffLimit | int64 | quote }}
- name: LANGMERGE_JOB_TTL_SECONDS
  value: {{ $v.jobs.ttlSecondsAfterFinished | int64 | quote }}
- name: LANGMERGE_KEEP_CHECKPOINTS
  value: {{ $v.jobs.keepCheckpoints | quote }}
- name: LANGMERGE_KUEUE_QUEUE
  value: {{ $v.jobs.kueueQueue | quote }}
- name: LANGMERGE_TRAINING_RUNTIME
  value: {{ $v.jobs.trainingRuntime | quote }}
- name: LANGMERGE_TRAINJOBS
  value: {{ $v.trainJob.enabled | quote }}
- name: LANGMERGE_TRAINJOB_RUNTIME
  value: {{ $v.trainJob.runtime | quote }}
- name: LANGMERGE_KSERVE
  value: {{ $v.serving.kserve.enabled | quote }}
- name: LANGMERGE_SERVING_POLL_SECONDS
  value: {{ $v.serving.pollSeconds | quote }}
- name: LANGMERGE_JOB_SERVICE_ACCOUNT
  value: {{ $v.jobs.serviceAccountName | quote }}
- name: LANGMERGE_TRAINER_LOG_LEVEL
  value: {{ $v.jobs.logLevel | quote }}
{{- if $v.jobs.env }}
- name: LANGMERGE_JOB_ENV
  value: {{ include "langmerge.operator.jobEnv" . | quote }}
{{- end }}
- name: LANGMERGE_RESYNC_SECONDS
  value: {{ $v.reconcile.resyncSeconds | quote }}
- name: LANGMERGE_PROGRESS_SECONDS
  value: {{ $v.reconcile.progressSeconds | quote }}
- name: LANGMERGE_HISTORY_LIMIT
  value: {{ $v.reconcile.historyLimit | int64 | quote }}
- name: LANGMERGE_WORKERS
  value: {{ $v.reconcile.workers | int64 | quote }}
- name: LANGMERGE_DELETE_ARTIFACTS_WITH_EXPERT
  value: {{ $v.reconcile.deleteArtifactsWithExpert | quote }}
- name: LANGMERGE_REQUEST_TIMEOUT_SECONDS
  value: {{ $v.reconcile.requestTimeoutSeconds | quote }}
- name: LANGMERGE_STORAGE_PROBE_SECONDS
  value: {{ $v.reconcile.storageProbeSeconds | quote }}
- name: LANGMERGE_JOB_RELIST_SECONDS
  value: {{ $v.reconcile.jobRelistSeconds | quote }}
- name: LANGMERGE_METRICS_PORT
  value: {{ ternary $v.metrics.port 0 $v.metrics.enabled | int64 | quote }}
{{- if $v.leaderElection.enabled }}
- name: LANGMERGE_LEADER_ELECTION_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}
- name: LANGMERGE_LEADER_ELECTION_LEASE_NAME
  value: {{ $v.leaderElection.leaseName | quote }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* jobs.env as K=V,K2=V2 in key order. */}}
{{- define "langmerge.operator.jobEnv" -}}
{{- $pairs := list }}
{{- range $k := keys .Values.jobs.env | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%v" $k (get $.Values.jobs.env $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
