# Board entry point: the node application lives in lib/ (shipped as .mpy).
import te_app

te_app.main()
