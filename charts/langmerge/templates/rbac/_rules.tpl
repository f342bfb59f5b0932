{{/*
What the operator does with the API, and nothing more. The same rules go into the ClusterRole (cluster-wide watch)
or into a Role in each watched namespace.
*/}}
{{- define "langmerge.rbac.operatorRules" -}}
# Its custom resources: kopf's watches (list, watch) and the reconcilers' reads (get). It never writes their spec.
- apiGroups: ["langmerge.dev"]
  resources: ["languageexperts", "mergedmodels"]
  verbs: ["get", "list", "watch"]
# Their status: the reconcilers' merge patches (Kube.patch_status).
- apiGroups: ["langmerge.dev"]
  resources: ["languageexperts/status", "mergedmodels/status"]
  verbs: ["patch"]
{{- if .Values.rbac.ownerReferencesPermissionEnforcement }}
# OwnerReferencesPermissionEnforcement: Jobs carry blockOwnerDeletion owner references to these objects.
- apiGroups: ["langmerge.dev"]
  resources: ["languageexperts/finalizers", "mergedmodels/finalizers"]
  verbs: ["update"]
{{- end }}
# The training and merge Jobs: created, watched by kopf (label app.kubernetes.io/managed-by=langmerge), listed to
# count and find them, deleted when outdated or orphaned. Never read one by name (no get).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
{{- if .Values.trainJob.enabled }}
# Kubeflow Trainer TrainJobs (trainJob.enabled): the same as Jobs. Created, watched and listed (label
# app.kubernetes.io/managed-by=langmerge), deleted when outdated, orphaned or failed for good. Never read by name.
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["list", "watch", "create", "delete"]
{{- end }}
{{- if .Values.serving.kserve.enabled }}
# KServe InferenceServices (serving.kserve.enabled): read by name and merge-patched to roll published revisions out
# (the predictor's storageUri and canaryTrafficPercent, and the serving.langmerge.dev/* annotations that record the
# rollout). Never created, listed, watched or deleted.
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "patch"]
{{- end }}
# Events about its custom resources (the reconcilers' and kopf's).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.s3.credentials.checkExists }}
# Whether the S3 Secret the Jobs read exists, before a Job takes a slot: get on that one name, read as metadata
# only (PartialObjectMetadata), never listed (s3.credentials.checkExists).
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ .Values.s3.credentials.secretName | quote }}]
  verbs: ["get"]
{{- end }}
{{- end }}

{{/*
kopf's observation of the cluster (read-only, cluster-scoped by nature; rbac.kopfObservation). Without these kopf
retries the forbidden requests for about a minute at every start, logging errors, before it falls back; with a
namespaced watch it serves nothing during that minute (measured on the local API server, see tests/helm).
*/}}
{{- define "langmerge.rbac.observationRules" -}}
# kopf's observation (rbac.kopfObservation): CRDs, so a running operator notices CRD changes.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not (include "langmerge.clusterwide" .) }}
# Namespaced watch only: kopf lists the namespaces to match watch.namespaces (cluster-wide it does not).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
