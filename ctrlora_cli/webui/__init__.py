"""``ctrlora ui``: a local Gradio app on the store and the ``ctrlora gen`` pipeline.

``layout`` builds the page, ``handlers`` answers its events (the same request, model lookup,
condition preparation and PNG recipes as ``ctrlora gen``), ``warm`` keeps the models loaded
between requests, ``store_tab`` lists, pulls and removes store entries. Nothing here holds tensor
math; Gradio is imported only by ``layout``.
"""
