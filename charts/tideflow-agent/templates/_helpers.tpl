{{/* Names, labels and checks shared by the templates. */}}

{{/* The site name, or a clear failure when it is missing or malformed. */}}
{{- define "tideflow-agent.site" -}}
{{- $site := (.Values.site | default dict).name | default "" }}
{{- if not $site }}
{{- fail "site.name is required: the name of the site this agent runs (lowercase letters, digits and '-'), e.g. --set site.name=line-2" }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" $site) }}
{{- fail (printf "site.name %q: lowercase letters, digits and '-' only, at most 63 characters, starting and ending with a letter or digit" $site) }}
{{- end }}
{{- $site }}
{{- end }}

{{- define "tideflow-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* One release per site: the site's name is part of every object's name. */}}
{{- define "tideflow-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "tideflow-agent-%s" (include "tideflow-agent.site" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "tideflow-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tideflow-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tideflow-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
tideflow.io/site: {{ include "tideflow-agent.site" . }}
{{- end }}

{{- define "tideflow-agent.labels" -}}
helm.sh/chart: {{ include "tideflow-agent.chart" . }}
{{ include "tideflow-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tideflow
{{- end }}

{{- define "tideflow-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* site.labels as the agent's --labels value: k=v,k=v in key order. */}}
{{- define "tideflow-agent.labelsArg" -}}
{{- $labels := (.Values.site | default dict).labels | default dict }}
{{- $pairs := list }}
{{- range $k := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $labels $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "tideflow-agent.claimName" -}}
{{- default (printf "%s-data" (include "tideflow-agent.fullname" .)) .Values.storage.persistentVolumeClaim.existingClaim }}
{{- end }}
