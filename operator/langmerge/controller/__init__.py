"""The operator: reconcilers for LanguageExpert and MergedModel, registered with kopf in :mod:`.main`."""
