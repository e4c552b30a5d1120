{{/* The control plane's name: its Deployment, Service, ServiceAccount and identity. */}}
{{- define "trellis.name" -}}trellis-control-plane{{- end -}}

{{/* The image of the control plane and of injected proxies. */}}
{{- define "trellis.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The DNS name proxies and the API server reach the control plane by. */}}
{{- define "trellis.host" -}}
{{ include "trellis.name" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/component: control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "trellis.selector" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/component: control-plane
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
