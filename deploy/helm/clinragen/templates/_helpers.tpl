{{- define "clinragen.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clinragen.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "clinragen.labels" -}}
app.kubernetes.io/name: {{ include "clinragen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: include "clinragen.selector" (list . "worker") */}}
{{- define "clinragen.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "clinragen.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "clinragen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "clinragen.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "clinragen.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The Redis URLs and the log key: every process needs them; tracing when it is on. */}}
{{- define "clinragen.commonEnv" -}}
- name: CLINRAGEN_CONFIG
  value: /etc/clinragen/site.toml
- name: CLINRAGEN_LOG_ID_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "logIdKey.existingSecret: name the Secret that holds the log id key" .Values.logIdKey.existingSecret }}
      key: {{ .Values.logIdKey.key }}
- name: CLINRAGEN_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.existingSecret: name the Secret that holds the Redis URLs" .Values.redis.existingSecret }}
      key: {{ .Values.redis.brokerUrlKey }}
- name: CLINRAGEN_RESULT_BACKEND
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.resultBackendKey }}
- name: CLINRAGEN_STATE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.stateUrlKey }}
{{- include "clinragen.tracingEnv" . }}
{{- end -}}

{{/* [tracing] by environment, when tracing.enabled; the collector's headers from a Secret */}}
{{- define "clinragen.tracingEnv" -}}
{{- $t := .Values.tracing -}}
{{- if $t.enabled }}
- name: CLINRAGEN_TRACING__ENABLED
  value: "true"
- name: CLINRAGEN_TRACING__OTLP_ENDPOINT
  value: {{ required "tracing.otlpEndpoint: the collector's traces URL (or set tracing.enabled=false)" $t.otlpEndpoint | quote }}
- name: CLINRAGEN_TRACING__SAMPLE_RATIO
  value: {{ $t.sampleRatio | quote }}
- name: CLINRAGEN_TRACING__ALLOW_INSECURE_HTTP
  value: {{ $t.allowInsecureHttp | quote }}
{{- if $t.existingSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $t.existingSecret }}
      key: {{ $t.headersKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "clinragen.podSpecCommon" -}}
serviceAccountName: {{ include "clinragen.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* config, /tmp and (when enabled) the SMART key */}}
{{- define "clinragen.volumes" -}}
- name: config
  configMap:
    name: {{ include "clinragen.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if .Values.fhir.smartKey.enabled }}
- name: smart-key
  secret:
    secretName: {{ required "fhir.smartKey.existingSecret: name the Secret that holds the SMART private key (or set fhir.smartKey.enabled=false)" .Values.fhir.smartKey.existingSecret }}
    defaultMode: 0440  # group: the pod's fsGroup (the secret's files are root-owned)
{{- end }}
{{- end -}}

{{- define "clinragen.volumeMounts" -}}
- name: config
  mountPath: /etc/clinragen
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.fhir.smartKey.enabled }}
- name: smart-key
  mountPath: /var/run/secrets/clinragen/smart
  readOnly: true
{{- end }}
{{- end -}}
