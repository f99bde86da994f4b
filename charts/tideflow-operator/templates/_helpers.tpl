{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "tideflow-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tideflow-operator.fullname" -}}
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

{{- define "tideflow-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tideflow-operator.labels" -}}
helm.sh/chart: {{ include "tideflow-operator.chart" . }}
{{ include "tideflow-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tideflow
{{- end }}

{{- define "tideflow-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tideflow-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tideflow-operator.brokerName" -}}
{{- printf "%s-broker" (include "tideflow-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tideflow-operator.brokerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tideflow-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "tideflow-operator.brokerLabels" -}}
helm.sh/chart: {{ include "tideflow-operator.chart" . }}
{{ include "tideflow-operator.brokerSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.broker.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tideflow
{{- end }}

{{- define "tideflow-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tideflow-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tideflow-operator.peeringName" -}}
{{- default (include "tideflow-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Quoted, comma-separated: the one name, or with shards > 1 each shard's <name>-<index>. */}}
{{- define "tideflow-operator.shardNames" -}}
{{- $base := index . 0 }}
{{- $shards := int (index . 1) }}
{{- if gt $shards 1 }}
{{- range $i := until $shards }}{{ if $i }}, {{ end }}{{ printf "%s-%d" $base $i | quote }}{{ end }}
{{- else }}
{{- $base | quote }}
{{- end }}
{{- end }}

{{- define "tideflow-operator.leaseName" -}}
{{- default (include "tideflow-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The broker URL the operator uses: mqtt.url, else the in-chart broker's Service. */}}
{{- define "tideflow-operator.brokerUrl" -}}
{{- if .Values.mqtt.url }}
{{- .Values.mqtt.url }}
{{- else if .Values.broker.enabled }}
{{- if and .Values.broker.tls.secretName (not .Values.broker.plainListener) }}
{{- printf "mqtts://%s.%s.svc:%d" (include "tideflow-operator.brokerName" .) .Release.Namespace (int .Values.broker.tls.port) }}
{{- else }}
{{- printf "mqtt://%s.%s.svc:%d" (include "tideflow-operator.brokerName" .) .Release.Namespace (int .Values.broker.service.port) }}
{{- end }}
{{- else }}
{{- fail "mqtt.url is required: the MQTT broker the sites use (mqtt://HOST:PORT or mqtts://HOST:PORT), or set broker.enabled=true to deploy one with this chart" }}
{{- end }}
{{- end }}

{{- define "tideflow-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Checks that span several values (the schema checks each value on its own). */}}
{{- define "tideflow-operator.validate" -}}
{{- $_ := include "tideflow-operator.brokerUrl" . }}
{{- if .Values.broker.enabled }}
{{- if not .Values.broker.passwordFileSecret.name }}
{{- fail "broker.passwordFileSecret.name is required with broker.enabled: an existing Secret holding a mosquitto_passwd file with the operator's user and one user per site" }}
{{- end }}
{{- if not .Values.mqtt.passwordSecret.name }}
{{- fail "mqtt.passwordSecret.name is required with broker.enabled: the in-chart broker allows no anonymous clients" }}
{{- end }}
{{- if not .Values.mqtt.username }}
{{- fail "mqtt.username is required with broker.enabled: the broker's ACL gives that user every site's topics" }}
{{- end }}
{{- if and (not .Values.broker.plainListener) (not .Values.broker.tls.secretName) }}
{{- fail "broker.plainListener=false needs broker.tls.secretName: the broker would have no listener" }}
{{- end }}
{{- $seen := dict }}
{{- range .Values.broker.sites }}
{{- $user := default .name .username }}
{{- if eq $user $.Values.mqtt.username }}
{{- fail (printf "broker.sites: site %q uses the operator's user %q; each site needs a user of its own" .name $user) }}
{{- end }}
{{- if hasKey $seen $user }}
{{- fail (printf "broker.sites: user %q is given to two sites; each site needs a user of its own" $user) }}
{{- end }}
{{- $_ := set $seen $user true }}
{{- end }}
{{- end }}
{{- end }}
